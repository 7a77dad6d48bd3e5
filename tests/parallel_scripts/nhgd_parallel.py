"""2 devices: NHGD with the Fisher update on the second device equals the fused loop.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=2; prints ``RESULT {json}`` with
the relative error (max |a - b| / max |b|) of the hypergradient, end point and Fisher
state after two outer steps, per Fisher variant.
"""

import jax
from common import PROBLEM, emit, rel_err, sampler, setup

import hypergrad_jax as hg
from hypergrad_jax import stochastic as st
from hypergrad_jax.fisher import DenseFisher, KFACFisher

RUN = hg.InnerRun(hg.optim.sgd(), 6, lambda h: {"lr": 0.3})


def variants():
    return {
        "dense_mean": DenseFisher(),
        "dense_woodbury": DenseFisher(samples="woodbury", average="mean"),
        "dense_sequential": DenseFisher(samples="sequential"),
        "dense_solve": DenseFisher(samples="woodbury", inverse="solve"),
        "kfac": KFACFisher(layers=(("w", "b"),)),
    }


def main():
    assert jax.device_count() == 2, jax.devices()
    hparams, params0, inner, outer, key = setup()
    errors = {}
    for name, fisher in variants().items():
        results = []
        for parallel in (False, True):
            method = st.NHGD(fisher=fisher, parallel=parallel)
            step = jax.jit(
                lambda s, k, m=method: m.step(PROBLEM, RUN, s, hparams, sampler(inner), outer, k)
            )
            state, out = method.init(params0, hparams), []
            for k in jax.random.split(key, 2):  # the second step uses the carried Fisher
                state, grad, _ = step(state, k)
                out.append(grad)
            results.append((out, state.params, state.method))
        errors[name] = rel_err(results[1], results[0])
    emit({"errors": errors})


if __name__ == "__main__":
    main()
