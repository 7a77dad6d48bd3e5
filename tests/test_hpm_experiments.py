"""The HPM experiments (experiments.hpm): the synthetic landscape's hypergradient against its
closed form, tiny runs end to end through the CLI, and kill + resume reaching the same final
state bitwise."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest

import hypergrad_jax as hg
from experiments import config as cfg_lib
from experiments import harness
from experiments.hpm import compare, digits, synthetic
from experiments.rundir import RunDir


class KilledError(Exception):
    """Stands for SIGKILL: the process dies in the middle of a ready interval."""


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """``hypergrad run hpm_synthetic --tiny`` uninterrupted, and once killed in its third
    ready interval (after the checkpoint at 2) and resumed."""
    full, killed = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("killed")
    result = problems.run_cli(full, "hpm_synthetic", "--tiny")
    calls = []
    real = harness.Progress.update

    def dies_at_third(self, **kw):
        calls.append(kw)
        if len(calls) == 3:
            raise KilledError
        return real(self, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness.Progress, "update", dies_at_third)
        with pytest.raises(KilledError):
            problems.run_cli(killed, "hpm_synthetic", "--tiny")
    (run,) = killed.iterdir()
    resumed = problems.run_cli(killed, "--resume", str(run))
    (full_run,) = full.iterdir()
    return result, full_run, resumed, run


def test_synthetic_hypergradient_is_the_closed_form():
    """The hypergradient the HPM members follow is exact: at the converged inner run, the
    implicit (Cholesky) estimate and the outer value equal the closed forms of the
    quadratic problem's F plus the Rastrigin term, and float64 central differences of F."""
    config = problems.tiny_config("hpm_synthetic")
    task, reference = synthetic.make_task(config)
    t = config.task
    exact = hg.testing.quadratic_problem(
        jax.random.key(config.seed), dim=t.dim, num_hparams=t.num_hparams, outer_reg=t.outer_reg
    )
    objective = lambda h: exact.objective(h) + t.ripple * jnp.sum(1 - jnp.cos(2 * jnp.pi * h))  # noqa: E731
    h = task.sample_hparams(jax.random.key(5))
    params0 = task.params0(jax.random.key(0))
    grad, info = hg.hypergradient(
        task.problem, task.run, task.estimator, h, params0, task.inner_data, task.outer_data
    )
    assert int(info.status) == hg.Status.OK
    # The inner run contracts the error by 1e-14 (quadratic_problem's default): both agree
    # with the closed form to ~1e-12 relative; 1e-9 leaves a margin.
    np.testing.assert_allclose(info.outer_value, objective(h), rtol=1e-9)
    np.testing.assert_allclose(grad, jax.grad(objective)(h), rtol=1e-9, atol=1e-12)
    check = hg.testing.check_hypergradient(objective, h, grad, rtol=1e-6)
    assert check.ok, check
    assert np.isfinite(reference) and reference <= float(objective(h))


def test_tiny_synthetic_runs_every_method(synthetic_runs):
    (code, stdout, stderr), run, _, _ = synthetic_runs
    assert code == 0, stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["methods"]
    assert list(rows) == list(compare.METHODS)
    assert summary["member_intervals"] == 3 * 5 and summary["seeds"] == 2
    for name, row in rows.items():
        assert np.isfinite(row["score"]) and row["seconds"] > 0, name
        assert row["regret"] == pytest.approx(row["score"] - summary["reference_minimum"])
        assert f"{row['hpm_better_seeds']}/2" in stdout
    # Every method starts from the same population per seed (the same keys), random search
    # never moves it, and gradient descent with a step below 2 / L only lowers F: hd's best
    # can only be lower.
    hd, rnd = (np.asarray(rows[m]["per_seed_score"]) for m in ("hd", "random"))
    assert np.all(hd <= rnd) and np.any(hd < rnd)
    for name in ("best_vs_budget", "hpm_mutation_strength", "population_trajectories"):
        png = (run / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert all(lines[i + 1]["hpm_best"] <= lines[i]["hpm_best"] for i in range(2))


def test_kill_and_resume_reach_the_same_final_state_bitwise(synthetic_runs):
    _, full, (code, stdout, stderr), killed = synthetic_runs
    assert code == 0, stderr[-3000:]
    assert "from outer step 2" in stdout
    a, b = (json.loads((r / "summary.json").read_text()) for r in (full, killed))
    for s in (a, b):
        for row in s["methods"].values():
            del row["seconds"]  # wall time, the one thing that differs
    assert a == b
    config = problems.tiny_config("hpm_synthetic")
    template = synthetic.build(config).init_state()
    states = [RunDir.open(r).restore(template)[1] for r in (full, killed)]
    for state in states:
        for record in state["methods"].values():
            del record["seconds"]
    chex.assert_trees_all_equal(*[jax.tree.map(_key_data, s) for s in states])


def _key_data(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def test_digits_hypergradient_reaches_every_hyperparameter():
    """Through the concrete-dropout MLP, SGD with momentum and the input noise, the
    hypergradient of all seven hyperparameters equals float64 central differences of the
    validation loss after the (deterministic given the key) inner run."""
    config = problems.tiny_config("hpm_digits")
    task = digits.make_task(config)
    key = jax.random.key(1)
    h = jax.tree.map(lambda x: x.astype(jnp.float64), task.sample_hparams(jax.random.key(2)))
    params0 = jax.tree.map(lambda x: x.astype(jnp.float64), task.params0(jax.random.key(3)))
    grad, info = hg.hypergradient(
        task.problem, task.run, task.estimator, h, params0, task.inner_data, task.outer_data,
        key=key,
    )  # fmt: skip
    assert int(info.status) == hg.Status.OK

    def objective(hh):
        return hg.hypergradient(
            task.problem, task.run, task.estimator, hh, params0, task.inner_data,
            task.outer_data, key=key,
        )[1].outer_value  # fmt: skip

    check = hg.testing.check_hypergradient(objective, h, grad, rtol=1e-5)
    assert check.ok, check  # float32 data, float64 parameters: ~1e-7 measured
    assert np.all(np.abs(np.asarray(check.analytic)) > 0)  # every hyperparameter matters


@pytest.mark.slow  # ~45 s: compiling the concrete-dropout MLP's population programs
def test_tiny_digits_end_to_end(tmp_path):
    # HPM alone: hypergradients through the concrete-dropout MLP, exploit and the teacher
    # (the other methods' paths run in the synthetic test; compiling dominates here).
    args = ["hpm_digits", "--tiny", "--set", "compare.methods=[hpm]"]
    code, stdout, stderr = problems.run_cli(tmp_path, *args)
    assert code == 0, stderr[-3000:]
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["methods"]) == ["hpm"] and summary["hparam_names"] == list(digits.NAMES)
    for row in summary["methods"].values():
        assert 0 <= row["test_acc"] <= 1 and np.isfinite(row["val_loss"])
        assert row["val_loss"] == pytest.approx(row["score"], rel=0.5)  # same data, same model
    assert "HPM (teacher)" in stdout
    assert (run / "plots" / "hpm_mutation_strength.png").is_file()


def test_digits_hyperparameters_round_trip_and_cover_their_ranges():
    h = digits.sample_hparams(jax.random.key(0), jnp.float64)
    values = np.asarray(digits.natural(h))
    assert values.shape == (len(digits.NAMES),)
    low = [1e-5, 1e-3, 0.01, 0.05, 0.05, 0.05, 0.5]
    high = [0.1, 1.0, 1.0, 0.5, 0.5, 0.5, 0.99]
    assert np.all(values >= low) and np.all(values <= high)
    transform = hg.population.Transform(digits.TRANSFORM)
    chex.assert_trees_all_close(transform.to_unconstrained(transform.to_constrained(h)), h)


@pytest.mark.parametrize(
    "experiment,sets,message",
    [
        ("hpm_synthetic", {"compare.fraction": 0.1}, "compare.fraction: 0.1 of compare.popul"),
        ("hpm_synthetic", {"compare.methods": ["hd", "hd"]}, "compare.methods: ['hd', 'hd']"),
        ("hpm_digits", {"model.hidden": [8]}, "model.hidden: [8]; expected two hidden"),
        ("hpm_digits", {"run.data_parallel": True}, "run.data_parallel: not supported"),
    ],
)
def test_bad_config_names_the_key(experiment, sets, message):
    with pytest.raises(cfg_lib.ConfigError, match=message.replace("[", "\\[")):
        config = problems.tiny_config(experiment, **sets)
        if experiment == "hpm_digits":
            digits.make_task(config)
