"""4 devices: hg.population.step with the members sharded over a mesh equals one device.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4; prints ``RESULT {json}`` with
per-part relative errors (max |a - b| / max |b| over a part's leaves) of two jitted HPM
intervals (8 members, Implicit/CG with a while_loop under vmap, the teacher), whether the
members' PRNG keys agree, how many members each exploit replaced, and the error message for 6
members on 4 devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import emit

import hypergrad_jax as hg

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

K = 8


def as_numbers(tree):
    """Every leaf but PRNG keys (compared apart: their bits dwarf the values) as one float64
    numpy vector."""
    leaves = [x for x in jax.tree.leaves(tree) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


def keys_equal(a, b):
    data = lambda s: np.asarray(jax.random.key_data(s.members.key))  # noqa: E731
    return bool(np.array_equal(data(a), data(b)))


def rel_err(a, b):
    a, b = as_numbers(a), as_numbers(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def main():
    assert jax.device_count() == 4, jax.devices()
    tp = hg.testing.ridge_regression(jax.random.key(0), num_train=24, num_val=16, dim=4)
    run = tp.run._replace(num_steps=8)
    opt = optax.adam(0.1)
    teacher = hg.population.Teacher(scale=0.5, features=4, optimizer=optax.sgd(0.5))
    hparams = jnp.linspace(-4.0, 0.0, K)
    state0 = hg.population.init(
        opt, hparams, lambda k: jax.random.normal(k, (4,)), jax.random.key(1), mutation=teacher
    )
    estimator = hg.Implicit(hg.CG(maxiter=50, tol=1e-10))

    def two_intervals(state, mesh):
        out = []
        for _ in range(2):
            state, metrics = hg.population.step(
                tp.problem, run, estimator, opt, teacher, state, tp.inner_data, tp.outer_data,
                interval=2, fraction=0.25, mesh=mesh,
            )  # fmt: skip
            out.append(metrics)
        return state, out

    mesh = hg.parallel.make_mesh(axis_name="population")
    sharded = jax.jit(lambda s: two_intervals(s, mesh))(state0)
    single = jax.jit(lambda s: two_intervals(s, None))(state0)
    errors = {
        "members": rel_err(sharded[0].members, single[0].members),
        "teacher": rel_err(sharded[0].mutation, single[0].mutation),
        "metrics": rel_err(sharded[1], single[1]),
    }
    same_keys = keys_equal(sharded[0], single[0])
    replaced = [int(np.sum(np.asarray(m.replaced))) for m in single[1]]
    small = jax.tree.map(lambda x: x[:6], state0.members)
    try:
        hg.population.step(
            tp.problem, run, estimator, opt, None, state0._replace(members=small),
            tp.inner_data, tp.outer_data, interval=1, fraction=0.0, mesh=mesh,
        )  # fmt: skip
        message = None
    except ValueError as e:
        message = str(e)
    emit({"errors": errors, "same_keys": same_keys, "replaced": replaced, "message": message})


if __name__ == "__main__":
    main()
