"""4 devices: data-parallel hypergradients equal the single-device ones.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4; prints ``RESULT {json}`` with
relative errors (max |a - b| / max |b|) per estimator and input kind, and the messages of
the errors raised for a batch size that is not a multiple of the device count.
"""

import time

import jax
import jax.numpy as jnp
from common import PROBLEM, RUN, emit, estimators, rel_err, sampler, setup
from jax.sharding import AxisType

import hypergrad_jax as hg
from hypergrad_jax import parallel


def main():
    assert jax.device_count() == 4, jax.devices()
    start, times = time.perf_counter(), {}
    hparams, params0, inner, outer, key = setup()
    sample = sampler(inner)
    mesh = parallel.make_mesh()
    dp = parallel.data_parallel(PROBLEM, mesh)
    errors, value_errors = {}, {}

    def both(problem, est, inner_data, outer_data=outer):
        return hg.hypergradient(
            problem, RUN, est, hparams, params0, inner_data, outer_data, key=key
        )

    def compare(tag, result, ref):
        (g, info), (g_ref, info_ref) = result, ref
        assert int(info.status) == hg.Status.OK, (tag, info)
        errors[tag] = rel_err(g, g_ref)
        value_errors[tag] = rel_err(info.outer_value, info_ref.outer_value)

    def scan_loss(params, hparams, batch):
        """A loss that scans over its shard (works because vma checking is off)."""
        x, _ = batch
        body = lambda c, xi: (c + jnp.sum(jnp.sin(xi @ params["w"])), None)  # noqa: E731
        total = jax.lax.scan(body, 0.0, x)[0] / x.shape[0]
        return total + jnp.exp(hparams["log_l2"]) * jnp.sum(params["b"] ** 2)

    dp_scan = parallel.data_parallel(hg.BilevelProblem(scan_loss, scan_loss), mesh)
    batch_h = jax.tree.map(lambda x: jnp.stack([x, x + 0.5]), hparams)
    v = jax.tree.map(jnp.ones_like, params0)

    # Single-device ("ref") vs data-parallel ("dp"), all in one outer jit: the calls' own
    # jits are inlined, so XLA compiles once (separate calls take ~2x longer on 2 cores).
    @jax.jit
    def single_vs_parallel():
        out = {
            (f"{name}/{data_kind}", kind): both(problem, est, data)
            for name, est in estimators().items()
            for data_kind, data in (("full", inner), ("sampler", sample))
            for kind, problem in (("ref", PROBLEM), ("dp", dp))
            if not (name == "forward" and data_kind == "sampler")  # same run as unrolled
        }
        # vmap over hyperparameters of the data-parallel hypergradient.
        for kind, problem in (("ref", PROBLEM), ("dp", dp)):
            hgrad = lambda h, problem=problem: hg.hypergradient(  # noqa: E731
                problem, RUN, hg.Unrolled(), h, params0, inner, outer
            )[0]
            out["unrolled/vmap", kind] = jax.vmap(hgrad)(batch_h)
            out["inner_hvp", kind] = hg.linalg.hvp(problem.inner_loss, params0, v, hparams, inner)
        out["scan_loss_grad", "ref"] = jax.grad(scan_loss)(params0, hparams, inner)
        out["scan_loss_grad", "dp"] = jax.grad(dp_scan.inner_loss)(params0, hparams, inner)
        return out

    results = single_vs_parallel()
    for tag, kind in results:
        if kind == "dp":
            if isinstance(results[tag, kind], tuple):  # (grad, info)
                compare(tag, results[tag, "dp"], results[tag, "ref"])
            else:
                errors[tag] = rel_err(results[tag, "dp"], results[tag, "ref"])
    times["single_vs_parallel"] = time.perf_counter() - start

    # hg.hypergradient called directly (its own jit) on batches placed on the mesh.
    sharded = (parallel.shard_batch(b, mesh) for b in (inner, outer))
    compare(
        "unrolled/sharded_eager",
        both(dp, hg.Unrolled(), *sharded),
        results["unrolled/full", "ref"],
    )
    times["sharded_eager"] = time.perf_counter() - start

    # Explicit mesh axes (jax.make_mesh's own default): inputs are resharded to the specs.
    dpx = parallel.data_parallel(PROBLEM, parallel.make_mesh(axis_type=AxisType.Explicit))
    explicit = jax.jit(lambda: [both(dpx, hg.Unrolled(), data) for data in (inner, sample)])()
    compare("unrolled/explicit_full", explicit[0], results["unrolled/full", "ref"])
    compare("unrolled/explicit_sampler", explicit[1], results["unrolled/sampler", "ref"])
    times["explicit"] = time.perf_counter() - start

    # Divisibility: 30 rows on 4 devices is refused with a clear error.
    messages = {}
    bad = jax.tree.map(lambda x: x[:30], inner)
    calls = {
        "hypergradient": lambda: both(dp, hg.Unrolled(), bad),
        "shard_batch": lambda: parallel.shard_batch(bad, mesh),
    }
    for what, call in calls.items():
        try:
            call()
            messages[what] = None
        except ValueError as e:
            messages[what] = str(e)
    times["total"] = time.perf_counter() - start
    emit({"errors": errors, "value_errors": value_errors, "messages": messages, "times": times})


if __name__ == "__main__":
    main()
