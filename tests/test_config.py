"""Config validation: declared errors come before building anything; sources are located.

The CLI's whole bad-input table lives in test_cli_errors.py.
"""

import pytest

from experiments import cli
from experiments import config as cfg_lib


@pytest.fixture
def no_build(monkeypatch):
    """Any attempt to build (load data, compute) fails the test."""
    from experiments.quickstart import experiment

    def build(_):
        raise AssertionError("build() was called for an invalid config")

    monkeypatch.setattr(experiment, "build", build)


@pytest.mark.parametrize(
    "override", ["outer.foo=1", "inner.num_steps=-5", "model.hidden=[0]", "seed=-1"]
)
def test_declared_errors_never_build(capsys, no_build, override):
    assert cli.main(["run", "quickstart", "--quiet", "--set", override]) == 2
    assert capsys.readouterr().err.startswith("hypergrad: error: --set: ")


def test_locate_blames_the_source_of_the_first_overridden_key():
    sources = {"data.batch_size": "--set", "inner": "f.yaml (preset tiny)"}
    assert cfg_lib.locate("data.batch_size: too big", "f.yaml", sources).startswith("--set: ")
    assert cfg_lib.locate("inner.num_steps: bad", "f.yaml", sources).startswith("f.yaml (preset")
    assert cfg_lib.locate("model.hidden[0]: bad", "f.yaml", sources).startswith("f.yaml: ")
    both = "data.val_fraction + data.batch_size: bad"
    assert cfg_lib.locate(both, "f.yaml", sources).startswith("--set: ")


def test_resolve_records_where_each_key_came_from():
    raw = {"experiment": "quickstart", "presets": {"tiny": {"inner.num_steps": 3}}}
    data = cfg_lib.resolve(raw, "q.yaml", "tiny", [("outer.lr", 0.5)])
    assert data.sources == {"inner.num_steps": "q.yaml (preset tiny)", "outer.lr": "--set"}
    assert "presets" not in data and "presets" in raw  # a copy


def test_every_config_validates_with_its_tiny_preset():
    for folder in cli.config_dirs():
        for path in folder.glob("*.yaml"):
            data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), "tiny")
            cli.load_config(data, str(path))


def test_list_shows_each_config_once(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.count("quickstart.yaml") == 1
    # every experiment name sits in one column, however long
    rows = [line for line in out.splitlines() if line.startswith("  ") and ".yaml" not in line]
    assert len({line.index(line.split()[1]) for line in rows}) == 1
