"""hypergrad_jax.parallel: meshes, data and population parallelism, multi-process start.

The pytest process has one CPU device (JAX is started by conftest), so multi-device checks
run scripts from tests/parallel_scripts/ in subprocesses whose device count is set before
JAX starts (XLA_FLAGS=--xla_force_host_platform_device_count=4, or two processes x 2
devices joined by jax.distributed with gloo collectives). Each script prints one line
``RESULT {json}``; every subprocess runs under a deadline and is killed when it passes.

Tolerances: data-parallel and single-device runs compute the same float64 maths with a
different summation order (shard means, then their mean; psum of per-shard gradients), so
they agree to a few ulps per operation; over 12 inner steps and a linear solve we observe
<= 4e-16 relative and assert 1e-12. population_map runs vmap on each device over its
members, so it matches vmap to the bit here and a Python loop to rounding (assert 1e-12).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import hypergrad_jax as hg
from hypergrad_jax import parallel

SCRIPTS = pathlib.Path(__file__).parent / "parallel_scripts"
TIMEOUT_S = 120  # per subprocess group: a hang (e.g. a lost peer) can never stall CI
RTOL = 1e-12


def _env(num_devices: int | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERGRAD_")}
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if num_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    # Compile-bound scripts: skipping LLVM's optimisations halves their time and changes no
    # result beyond rounding (both sides of every comparison are compiled the same way).
    flags.append("--xla_backend_optimization_level=0")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(script: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / script)],
        cwd=SCRIPTS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _results(procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    """Waits for every process under one deadline; kills them all on timeout or failure."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{proc.args[-1]} did not finish within {timeout} s")
            assert proc.returncode == 0, f"{proc.args[-1]} failed:\n{out[-4000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"no RESULT line in:\n{out[-4000:]}"
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


@pytest.fixture(scope="module")
def four_device_scripts():
    """Starts both 4-device scripts at once (compilation is mostly single-threaded, so the
    two overlap on two cores) and collects each result when a test first asks for it."""
    procs = {
        name: _launch(f"{name}.py", _env(num_devices=4)) for name in ("data_parallel", "population")
    }
    cache = {}

    def result(name):
        if name not in cache:
            cache[name] = _results([procs[name]], TIMEOUT_S)[0]
        return cache[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _assert_close(errors: dict, rtol: float = RTOL) -> None:
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    assert not bad, f"relative errors above {rtol}: {bad}"


# --------------------------------------------------------------------------- 4 devices


def test_data_parallel_hypergradients_equal_single_device(four_device_scripts):
    result = four_device_scripts("data_parallel")
    errors = result["errors"]
    for est in ("unrolled", "forward", "implicit"):
        assert f"{est}/full" in errors
    for case in ("unrolled/sampler", "implicit/sampler", "unrolled/sharded_eager"):
        assert case in errors
    assert {"unrolled/explicit_full", "unrolled/explicit_sampler", "unrolled/vmap"} <= errors.keys()
    _assert_close(errors)
    _assert_close(result["value_errors"])


def test_data_parallel_refuses_indivisible_batch(four_device_scripts):
    messages = four_device_scripts("data_parallel")["messages"]
    for what in ("hypergradient", "shard_batch"):
        assert messages[what] is not None, f"{what} accepted 30 rows on 4 devices"
        assert "batch size 30 is not divisible by the 4 devices" in messages[what]


def test_population_map_equals_vmap_and_loop(four_device_scripts):
    result = four_device_scripts("population")
    errors = result["errors"]
    for name in ("unrolled", "implicit", "sampled", "value"):
        assert f"{name}/vs_vmap" in errors and f"{name}/vs_loop" in errors
    assert "unrolled/population_x_data" in errors
    _assert_close(errors)
    assert result["spec"] == ["population"]  # outputs stay sharded over members
    assert "population size 6 is not divisible by the 4 devices" in result["message"]


# --------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process():
    port = _free_port()
    procs = [
        _launch(
            "multiprocess.py",
            _env(
                HYPERGRAD_COORDINATOR=f"127.0.0.1:{port}",
                HYPERGRAD_NUM_PROCESSES=2,
                HYPERGRAD_PROCESS_ID=i,
                HYPERGRAD_LOCAL_DEVICE_COUNT=2,
            ),
        )
        for i in range(2)
    ]
    results = _results(procs, TIMEOUT_S)
    for i, result in enumerate(results):
        assert result["info"] == {
            "process_index": i,
            "process_count": 2,
            "local_device_count": 2,
            "device_count": 4,
        }
        assert result["mesh_processes"] == [0, 1]  # the mesh spans both processes
        assert {"unrolled/global", "implicit/process_local", "unrolled/plain"} <= set(
            result["errors"]
        )
        _assert_close(result["errors"])
    assert results[0]["grads"] == results[1]["grads"]  # one replicated result


# --------------------------------------------------------------------------- in-process


def test_make_mesh_one_device():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == jax.device_count()
    assert mesh.axis_types == (AxisType.Auto,)
    assert parallel.make_mesh(1, "population").axis_names == ("population",)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_make_mesh_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="num_devices: expected a positive int"):
        parallel.make_mesh(bad)


def test_make_mesh_too_many_devices():
    n = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"asked for {n} devices but only {n - 1} exist"):
        parallel.make_mesh(n)


def _quadratic():
    def loss(params, hparams, batch):
        x, y = batch
        return jnp.mean((x @ params - y) ** 2) + jnp.exp(hparams["log_l2"]) * params @ params

    return hg.BilevelProblem(loss, loss)


def test_data_parallel_one_device_is_the_plain_loss(getkey):
    problem, mesh = _quadratic(), parallel.make_mesh(1)
    dp = parallel.data_parallel(problem, mesh)
    x = jax.random.normal(getkey(), (8, 3))
    batch, params, hparams = (x, x @ jnp.ones(3)), jnp.zeros(3) + 0.1, {"log_l2": -1.0}
    np.testing.assert_allclose(
        jax.jit(jax.grad(dp.inner_loss))(params, hparams, batch),
        jax.jit(jax.grad(problem.inner_loss))(params, hparams, batch),
        rtol=1e-14,
    )
    # Equal problems for equal arguments: hg.hypergradient's jit cache is reused.
    assert parallel.data_parallel(problem, mesh) == dp
    assert hash(parallel.data_parallel(problem, mesh)) == hash(dp)
    assert parallel.data_parallel(problem, mesh, outer=False).outer_loss is problem.outer_loss
    placed = parallel.shard_batch(batch, mesh)
    assert placed[0].sharding.spec == P("data")
    assert parallel.replicate(params, mesh).sharding.spec == P()


def test_data_parallel_batch_errors():
    mesh = parallel.make_mesh(1)
    dp = parallel.data_parallel(_quadratic(), mesh)
    params, hparams = jnp.zeros(3), {"log_l2": 0.0}
    with pytest.raises(ValueError, match=r"batch\[1\]: a scalar has no leading batch axis"):
        dp.inner_loss(params, hparams, (jnp.ones((4, 3)), jnp.float32(1.0)))
    with pytest.raises(ValueError, match="same leading .batch. size"):
        dp.inner_loss(params, hparams, (jnp.ones((4, 3)), jnp.ones(5)))
    with pytest.raises(ValueError, match="has no array leaves"):
        parallel.shard_batch({}, mesh)


def test_data_parallel_argument_errors():
    mesh = parallel.make_mesh(1)
    with pytest.raises(ValueError, match=r"axis_name: 'batch' is not an axis of mesh.*\('data',\)"):
        parallel.data_parallel(_quadratic(), mesh, "batch")
    with pytest.raises(TypeError, match="problem: expected a BilevelProblem"):
        parallel.data_parallel(lambda p, h, b: 0.0, mesh)
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
        parallel.data_parallel(_quadratic(), "data")


def test_population_map_one_device_equals_vmap(getkey):
    mesh = parallel.make_mesh(1, "population")
    fn = lambda h, x, y: {"a": jnp.sum(h["w"] * x) + y, "b": h["w"] ** 2}  # noqa: E731
    hs = {"w": jax.random.normal(getkey(), (4, 3))}
    xs, y = jax.random.normal(getkey(), (4, 3)), jnp.float32(2.0)
    out = parallel.population_map(fn, mesh, args_axes=(0, None))(hs, xs, y)
    ref = jax.vmap(fn, in_axes=(0, 0, None))(hs, xs, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-14), out, ref)


def test_population_map_argument_errors():
    mesh = parallel.make_mesh(1, "population")
    fn = lambda h, x: h * x  # noqa: E731
    hs = jnp.ones(4)
    with pytest.raises(ValueError, match="args_axes: has 2 entries but .* with 1 argument"):
        parallel.population_map(fn, mesh, args_axes=(0, None))(hs, hs)
    with pytest.raises(ValueError, match="args_axes: entries must be 0 .* got 1"):
        parallel.population_map(fn, mesh, args_axes=(1,))(hs, hs)
    with pytest.raises(ValueError, match="same leading .population. size"):
        parallel.population_map(fn, mesh, args_axes=0)(hs, jnp.ones(3))
    with pytest.raises(ValueError, match="a scalar has no leading population axis"):
        parallel.population_map(fn, mesh)(jnp.float32(1.0), hs)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        parallel.population_map(None, mesh)


# --------------------------------------------------------------------------- initialize


@pytest.fixture
def clean_env(monkeypatch):
    for var in (
        parallel.ENV_COORDINATOR,
        parallel.ENV_NUM_PROCESSES,
        parallel.ENV_PROCESS_ID,
        parallel.ENV_LOCAL_DEVICE_COUNT,
    ):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_initialize_single_process_is_a_no_op(clean_env):
    info = parallel.initialize()
    assert info == parallel.ProcessInfo(0, 1, jax.local_device_count(), jax.device_count())
    clean_env.setenv(parallel.ENV_NUM_PROCESSES, "1")
    assert parallel.initialize() == info
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HYPERGRAD_NUM_PROCESSES": "two"}, "HYPERGRAD_NUM_PROCESSES='two' is not an integer"),
        ({"HYPERGRAD_NUM_PROCESSES": "0"}, "HYPERGRAD_NUM_PROCESSES='0' must be >= 1"),
        (
            {"HYPERGRAD_NUM_PROCESSES": "2", "HYPERGRAD_PROCESS_ID": "0"},
            "coordinator_address: required with num_processes=2",
        ),
        (
            {"HYPERGRAD_NUM_PROCESSES": "2", "HYPERGRAD_COORDINATOR": "127.0.0.1:1234"},
            "process_id: required with num_processes=2",
        ),
        (
            {
                "HYPERGRAD_NUM_PROCESSES": "2",
                "HYPERGRAD_PROCESS_ID": "2",
                "HYPERGRAD_COORDINATOR": "127.0.0.1:1234",
            },
            r"process_id: 2 is out of range for num_processes=2 \(expected 0 .. 1\)",
        ),
        (
            {
                "HYPERGRAD_NUM_PROCESSES": "2",
                "HYPERGRAD_PROCESS_ID": "1",
                "HYPERGRAD_COORDINATOR": "localhost",
            },
            "HYPERGRAD_COORDINATOR='localhost' is not of the form 'host:port'",
        ),
        (
            {
                "HYPERGRAD_NUM_PROCESSES": "2",
                "HYPERGRAD_PROCESS_ID": "1",
                "HYPERGRAD_COORDINATOR": "localhost:99999",
            },
            "has port 99999; expected 1..65535",
        ),
        ({"HYPERGRAD_PROCESS_ID": "-1"}, "HYPERGRAD_PROCESS_ID='-1' must be >= 0"),
        ({"HYPERGRAD_PROCESS_ID": "1"}, "process_id: 1 is out of range for num_processes=1"),
        ({"HYPERGRAD_LOCAL_DEVICE_COUNT": "0"}, "HYPERGRAD_LOCAL_DEVICE_COUNT='0' must be >= 1"),
    ],
)
def test_initialize_rejects_bad_environment(clean_env, env, message):
    for var, value in env.items():
        clean_env.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        parallel.initialize()
    assert not jax.distributed.is_initialized()


def test_initialize_rejects_bad_arguments(clean_env):
    with pytest.raises(ValueError, match="num_processes: expected an int >= 1, got '2'"):
        parallel.initialize(num_processes="2")
    with pytest.raises(ValueError, match="coordinator_address: 'host:port:x' is not of the form"):
        parallel.initialize("host:port:x", num_processes=2, process_id=0)
    # Arguments win over the environment.
    clean_env.setenv(parallel.ENV_NUM_PROCESSES, "two")
    assert parallel.initialize(num_processes=1).process_count == 1


def test_initialize_local_device_count_after_start(clean_env):
    jax.devices()  # the backend is running in this process
    n = jax.local_device_count() + 1
    with pytest.raises(RuntimeError, match=f"local_device_count={n}: JAX has already started"):
        parallel.initialize(local_device_count=n)


# --------------------------------------------------------------------------- 2 devices


def test_parallel_nhgd_equals_the_fused_loop():
    # The pipelined two-device loop performs the fused loop's updates in the same order
    # with the same operands, so the numbers agree to rounding (observed: bit-identical).
    result = _results([_launch("nhgd_parallel.py", _env(num_devices=2))], TIMEOUT_S)[0]
    assert {"dense_mean", "dense_woodbury", "dense_solve", "kfac"} <= result["errors"].keys()
    _assert_close(result["errors"])
