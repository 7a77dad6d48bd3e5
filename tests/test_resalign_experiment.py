"""The resalign experiment end to end at its tiny preset (pre-training cached in a temporary
folder), killed after its second unit and resumed."""

import json

import numpy as np
import problems
import pytest

from experiments import cli
from experiments import config as cfg_lib
from experiments.resalign import experiment
from experiments.rundir import RunDir


class KilledError(Exception):
    """Stands for SIGKILL."""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """``hypergrad run resalign --tiny`` with two methods, killed while logging its third
    unit (after the checkpoint of two), then resumed; the killed run's third metrics line is
    kept to compare with the recomputed one."""
    out, cache = tmp_path_factory.mktemp("resalign"), tmp_path_factory.mktemp("cache")
    args = ["resalign", "--tiny", "--set", "methods=[none,esd,resalign]"]
    calls = []
    real = RunDir.log  # once per unit (pre-training has progress bars of its own)

    def dies_at_third(self, record):
        calls.append(record)
        real(self, record)
        if len(calls) == 3:
            raise KilledError

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYPERGRAD_CACHE", str(cache))
        mp.setattr(RunDir, "log", dies_at_third)
        with pytest.raises(KilledError):
            problems.run_cli(out, *args)
        mp.undo()
        mp.setenv("HYPERGRAD_CACHE", str(cache))
        (run,) = out.iterdir()
        lines = (run / "metrics.jsonl").read_text().splitlines()
        result = problems.run_cli(out, "--resume", str(run))
    return result, run, json.loads(lines[2])


def test_tiny_run_resumes_and_reports_every_method(resumed):
    (code, stdout, stderr), run, killed_line = resumed
    assert code == 0, stderr[-3000:]
    assert "from outer step 2" in stdout and "ResAlign (hg.Moreau)" in stdout
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["unit"] for m in lines] == [0, 1, 2]
    # The unit recomputed after the kill equals the one the killed run had computed.
    assert lines[2]["harmful_after_first_attack"] == killed_line["harmful_after_first_attack"]
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["methods"]) == ["none", "esd", "resalign"]
    assert summary["stages"] == ["unlearned", "adam_all_5"]
    for row in summary["methods"].values():
        for stage in row["stages"].values():
            assert 0 <= stage["harmful_rate"] <= 1 and 0 <= stage["benign_accuracy"] <= 1
            assert np.isfinite(stage["frechet"]) and stage["frechet"] >= 0
    resalign = summary["methods"]["resalign"]
    assert resalign["hypergradients"] == 2  # 2 outer steps × 1 configuration
    png = (run / "plots" / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    "sets,message",
    [
        ({"finetune.subsets": [[0, 1]]}, "finetune.subsets[0]: [0, 1]; expected benign"),
        ({"methods": ["esd", "esd"]}, "methods: ['esd', 'esd']; expected distinct"),
        ({"unlearn.lam": 1.5}, "unlearn.lam: expected a value >= 0 and <= 1"),
        ({"run.data_parallel": True}, "run.data_parallel: not supported by resalign"),
    ],
)
def test_bad_config_names_the_key(sets, message):
    with pytest.raises(cfg_lib.ConfigError, match=message.replace("[", "\\[")):
        problems.tiny_config("resalign", **sets)


def test_the_yaml_config_and_its_presets_validate():
    path = cli.find_config("resalign")
    for preset in (None, "tiny"):
        data = cfg_lib.resolve(cfg_lib.load_yaml(path), str(path), preset)
        _, config = cli.load_config(data, str(path))
        assert isinstance(config, experiment.Config)
    full = problems.tiny_config("resalign", preset=None)
    sizes = [len(getattr(full.finetune, k)) for k in ("subsets", "lrs", "steps", "optimizers")]
    assert np.prod(sizes) * len(full.finetune.modes) >= 12  # the distribution
    assert full.eval.seeds >= 3 and len(full.attacks) >= 3
