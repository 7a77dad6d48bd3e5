"""4 devices: population_map over 8 hyperparameter settings equals vmap and a Python loop.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4; prints ``RESULT {json}`` with
relative errors (max |a - b| / max |b|), the output sharding and error messages.
"""

import time

import jax
import jax.numpy as jnp
from common import PROBLEM, RUN, emit, rel_err, sampler, setup
from jax.sharding import AxisType

import hypergrad_jax as hg
from hypergrad_jax import parallel

POPULATION = 8


def main():
    assert jax.device_count() == 4, jax.devices()
    start, times = time.perf_counter(), {}
    hparams0, params0, inner, outer, key = setup()
    sample = sampler(inner)
    population = {
        "log_l2": jnp.linspace(-3.0, 0.0, POPULATION),
        "log_lr": jnp.log(jnp.linspace(0.2, 0.8, POPULATION)),
    }
    keys = jax.random.split(key, POPULATION)
    member = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731

    def fn(h, key, outer_data, problem=PROBLEM, only_unrolled=False):
        """One member: full-batch Unrolled and Implicit (CG: a while_loop under vmap), and
        Unrolled on the member's own minibatch stream (its own key)."""
        run = lambda est, data, **kw: hg.hypergradient(  # noqa: E731
            problem, RUN, est, h, params0, data, outer_data, **kw
        )
        g_unrolled, info = run(hg.Unrolled(), inner)
        out = {"unrolled": g_unrolled, "value": info.outer_value}
        if not only_unrolled:
            out["implicit"] = run(hg.Implicit(hg.CG(tol=1e-12)), inner)[0]
            out["sampled"] = run(hg.Unrolled(), sample, key=key)[0]
        return out

    mesh = parallel.make_mesh(axis_name="population")
    # Keys per member (0), outer data shared by all members (None).
    mapped = parallel.population_map(fn, mesh, args_axes=(0, None))
    out = mapped(population, keys, outer)
    times["population_map"] = time.perf_counter() - start
    reference = jax.jit(jax.vmap(fn, in_axes=(0, 0, None)))(population, keys, outer)
    times["vmap"] = time.perf_counter() - start
    one = jax.jit(fn)
    loop = stack([one(member(population, i), keys[i], outer) for i in range(POPULATION)])
    times["loop"] = time.perf_counter() - start
    errors = {}
    for name in out:
        errors[f"{name}/vs_vmap"] = rel_err(out[name], reference[name])
        errors[f"{name}/vs_loop"] = rel_err(out[name], loop[name])
    spec = tuple(out["value"].sharding.spec)

    # Population x data on a 2 x 2 mesh: members split over "population", each member's
    # batches split over "data" (data_parallel inside population_map).
    mesh2 = jax.make_mesh((2, 2), ("population", "data"), axis_types=(AxisType.Auto,) * 2)
    dp = parallel.data_parallel(PROBLEM, mesh2, "data")
    both = parallel.population_map(
        lambda h, k: fn(h, k, outer, dp, only_unrolled=True), mesh2, args_axes=0
    )
    out2 = both(population, keys)
    for name in out2:
        errors[f"{name}/population_x_data"] = rel_err(out2[name], reference[name])
    times["population_x_data"] = time.perf_counter() - start

    # 6 members on 4 devices: refused with a clear error.
    try:
        mapped(member(population, slice(0, 6)), keys[:6], outer)
        message = None
    except ValueError as e:
        message = str(e)

    emit({"errors": errors, "spec": [str(s) for s in spec], "message": message, "times": times})


if __name__ == "__main__":
    main()
