"""The standing bad-input table: every CLI mistake is one line, before any compute.

For each case: exit code 2, at most 2 lines on stderr, the offending key and its source (the
file, its preset, or --set) named, no traceback, and no run directory left behind.
"""

import pytest

from experiments import cli

BAD_YAML = "experiment: quickstart\ninner: {num_steps: [1, 2}\n"
NO_EXPERIMENT = "seed: 0\ninner: {num_steps: 3}\n"
BAD_IN_FILE = "experiment: quickstart\ninner: {num_steps: 0}\n"
BAD_PRESET = "experiment: quickstart\npresets:\n  tiny: {inner.num_steps: -1}\n"
SET = ["--set"]

# (id, arguments after `run`, files to write {name: text}, expected text on stderr)
CASES = [
    # values checked against their declaration
    ("unknown key", [*SET, "outer.foo=1"], {}, "--set: outer.foo: unknown key; allowed keys"),
    ("wrong type", [*SET, "inner.num_steps=abc"], {}, "--set: inner.num_steps: expected int"),
    ("negative steps", [*SET, "inner.num_steps=-5"], {}, "inner.num_steps: expected a value >= 1"),
    ("out of range", [*SET, "inner.momentum=1.5"], {}, "--set: inner.momentum: expected a value"),
    ("bad choice", [*SET, "outer.estimator=magic"], {}, "--set: outer.estimator: expected one of"),
    ("not a mapping", [*SET, "data=3"], {}, "--set: data: expected a mapping with keys"),
    ("bad list item", [*SET, "model.hidden=[8, x]"], {}, "--set: model.hidden[1]: expected int"),
    (
        "negative width",
        [*SET, "model.hidden=[-3]"],
        {},
        "--set: model.hidden[0]: expected a value >= 1, got -3",
    ),
    (
        "zero width",
        [*SET, "model.hidden=[0]"],
        {},
        "--set: model.hidden[0]: expected a value >= 1, got 0",
    ),
    ("negative seed", [*SET, "seed=-1"], {}, "--set: seed: expected a value >= 0, got -1"),
    (
        "unknown experiment",
        [*SET, "experiment=nope"],
        {},
        "--set: experiment: unknown experiment 'nope'",
    ),
    # cross-field
    (
        "fractions sum to 1",
        [*SET, "data.val_fraction=0.6", *SET, "data.test_fraction=0.5"],
        {},
        "--set: data.val_fraction + data.test_fraction: 0.6 + 0.5 >= 1",
    ),
    (
        "widths divide steps",
        ["fds_noise", *SET, "noise.widths=[1, 3]"],
        {},
        "--set: noise.widths: [3] do not divide inner.num_steps",
    ),
    # checked against the data, right after loading it
    (
        "batch larger than data",
        [*SET, "data.batch_size=100000"],
        {},
        "--set: data.batch_size: 100000 > 899 training examples",
    ),
    (
        "too many samples",
        [*SET, "data.num_samples=100000"],
        {},
        "--set: data.num_samples: 100000, but dataset 'digits' has 1797",
    ),
    (
        "mnist1d multiple of 10",
        [*SET, "data.name=mnist1d", *SET, "data.num_samples=15"],
        {},
        "--set: data.num_samples: 15; mnist1d generates a multiple of 10",
    ),
    (
        "no validation left",
        [*SET, "data.num_samples=10", *SET, "data.val_fraction=0.01"],
        {},
        "--set: data.val_fraction: 0.01 of 10 examples leaves no validation",
    ),
    (
        "data_parallel unsupported",
        ["fds_noise", *SET, "run.data_parallel=true"],
        {},
        "--set: run.data_parallel: not supported by fds_noise",
    ),
    (
        "data_parallel in the NHGD comparison",
        ["nhgd_regularization", *SET, "run.data_parallel=true"],
        {},
        "--set: run.data_parallel: not supported by the NHGD comparison",
    ),
    (
        "nhgd batch",
        ["nhgd_hyper_cleaning", *SET, "data.batch_size=100000"],
        {},
        "--set: data.batch_size: 100000 > ",
    ),
    (
        "nhgd task batch",
        ["nhgd_regularization", *SET, "data.val_batch=100000"],
        {},
        "--set: data.val_batch: 100000 > ",
    ),
    (
        "nhgd task samples",
        ["nhgd_distillation", *SET, "data.num_samples=100000"],
        {},
        "--set: data.num_samples: 100000, but dataset",
    ),
    # files
    (
        "no such file",
        ["nonexistent.yaml"],
        {},
        "nonexistent.yaml: no such config file; known configs: [",
    ),
    (
        "bad YAML",
        ["{dir}/bad.yaml"],
        {"bad.yaml": BAD_YAML},
        "bad.yaml: not valid YAML: expected ',' or ']', but got '}' (line 2, column 25)",
    ),
    (
        "empty file",
        ["{dir}/empty.yaml"],
        {"empty.yaml": ""},
        "empty.yaml: top level: expected a mapping, got None",
    ),
    (
        "list file",
        ["{dir}/list.yaml"],
        {"list.yaml": "- a\n"},
        "list.yaml: top level: expected a mapping",
    ),
    (
        "missing experiment",
        ["{dir}/noexp.yaml"],
        {"noexp.yaml": NO_EXPERIMENT},
        "noexp.yaml: experiment: missing required key; allowed: [",
    ),
    (
        "bad value in file",
        ["{dir}/file.yaml", *SET, "seed=1"],
        {"file.yaml": BAD_IN_FILE},
        "file.yaml: inner.num_steps: expected a value >= 1, got 0",
    ),
    (
        "bad value in preset",
        ["{dir}/preset.yaml", "--tiny"],
        {"preset.yaml": BAD_PRESET},
        "preset.yaml (preset tiny): inner.num_steps: expected a value >= 1, got -1",
    ),
    ("no such preset", ["--preset", "huge"], {}, "presets: no preset 'huge'; defined: ['tiny']"),
    # the command line itself
    ("set without value", [*SET, "outer.lr"], {}, "--set: expected key=value, got 'outer.lr'"),
    (
        "set through a value",
        [*SET, "data.name.x=1"],
        {},
        "--set: data.name.x: name is not a mapping",
    ),
    ("resume a non-run", ["--resume", "{dir}"], {}, "is not a run directory (no config.yaml)"),
    (
        "resume with set",
        ["--resume", "{dir}", *SET, "seed=1"],
        {},
        "--resume: takes no config, --set or --preset",
    ),
]


@pytest.mark.parametrize("args,files,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_compute(tmp_path, capsys, args, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "runs"
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    code = cli.main(["run", *args, "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, captured
    assert 1 <= len(err) <= 2 and "Traceback" not in captured.err, err
    assert err[0].startswith("hypergrad: error: ") and expected in err[0], err[0]
    assert not out.exists() or not any(out.iterdir())  # no run directory left behind


def test_integer_literal_for_a_float_is_converted():
    data = cli.cfg_lib.resolve(
        cli.cfg_lib.load_yaml(cli.find_config("quickstart")), "q", overrides=[("outer.lr", 1)]
    )
    _, config = cli.load_config(data, "q")
    assert config.outer.lr == 1.0 and isinstance(config.outer.lr, float)
