"""Config mistakes fail before any compute, with one line naming file, key, value, allowed."""

import pytest

from experiments import cli


@pytest.fixture
def no_build(monkeypatch):
    """Any attempt to build (compute) fails the test."""
    from experiments.quickstart import experiment

    def build(_):
        raise AssertionError("build() was called for an invalid config")

    monkeypatch.setattr(experiment, "build", build)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("outer.foo=1", "outer.foo: unknown key; allowed keys here: ['estimator', 'lr'"),
        ("inner.num_steps=abc", "inner.num_steps: expected int, got 'abc'"),
        ("inner.num_steps=-5", "inner.num_steps: expected a value >= 1, got -5"),
        ("outer.lr=-0.1", "outer.lr: expected a value > 0, got -0.1"),
        ("inner.momentum=1.5", "inner.momentum: expected a value >= 0 and < 1, got 1.5"),
        ("outer.estimator=magic", "outer.estimator: expected one of 'forward', 'unrolled'"),
        ("data.name=cifar10", "data.name: expected one of 'digits', 'breast_cancer', 'mnist1d'"),
        ("model.hidden=[8, x]", "model.hidden[1]: expected int, got 'x'"),
        ("experiment=nope", "unknown experiment 'nope'; allowed: ['fds_memory', 'fds_noise'"),
        ("data=3", "data: expected a mapping with keys"),
    ],
)
def test_bad_values_name_file_key_value_and_allowed(capsys, no_build, override, expected):
    assert cli.main(["run", "quickstart", "--quiet", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("hypergrad: error: ") and "configs/quickstart.yaml: " in err
    assert expected in err, err


def test_missing_files_presets_and_overrides(capsys, no_build, tmp_path):
    assert cli.main(["run", "nonexistent.yaml"]) == 2
    err = capsys.readouterr().err
    assert "nonexistent.yaml: no such config file; known configs: [" in err
    assert "'quickstart.yaml'" in err
    assert cli.main(["run", "quickstart", "--preset", "huge"]) == 2
    assert "presets: no preset 'huge'; defined: ['tiny']" in capsys.readouterr().err
    assert cli.main(["run", "quickstart", "--set", "outer.lr"]) == 2
    assert "--set: expected key=value, got 'outer.lr'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: quickstart\ninner: {num_steps: 0}\n")
    assert cli.main(["run", str(bad)]) == 2
    assert f"{bad}: inner.num_steps: expected a value >= 1, got 0" in capsys.readouterr().err
    bad.write_text("- a list\n")
    assert cli.main(["run", str(bad)]) == 2
    assert "top level: expected a mapping" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_cross_field_checks_name_the_file(capsys):
    assert cli.main(["run", "fds_noise", "--set", "noise.widths=[1, 3]"]) == 2
    err = capsys.readouterr().err
    assert "configs/fds_noise.yaml: noise.widths: [3] do not divide inner.num_steps" in err


def test_every_config_validates_with_its_tiny_preset():
    from experiments import config as cfg_lib

    for folder in cli.config_dirs():
        for path in folder.glob("*.yaml"):
            data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), "tiny")
            cli.load_config(data, str(path))
