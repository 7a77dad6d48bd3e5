"""One of two processes x 2 CPU devices: the data-parallel hypergradient over the 4-device
global mesh equals the single-process one.

Launched by tests/test_parallel.py with HYPERGRAD_COORDINATOR, HYPERGRAD_NUM_PROCESSES,
HYPERGRAD_PROCESS_ID and HYPERGRAD_LOCAL_DEVICE_COUNT set; prints ``RESULT {json}``.
"""

import jax
import numpy as np

from hypergrad_jax import parallel

# First, before any JAX computation: starts jax.distributed with gloo CPU collectives.
info = parallel.initialize()

from common import PROBLEM, RUN, emit, estimators, rel_err, sampler, setup  # noqa: E402

import hypergrad_jax as hg  # noqa: E402


def main():
    hparams, params0, inner, outer, key = setup()  # the same values in every process
    sample = sampler(inner)
    mesh = parallel.make_mesh()  # the 4 global devices
    dp = parallel.data_parallel(PROBLEM, mesh)

    def all_estimators(problem, inner_data, outer_data, names=None):
        def run(est, data):
            args = (hparams, params0, data, outer_data)
            return hg.hypergradient(problem, RUN, est, *args, key=key)[0]

        cases = {name: (est, inner_data) for name, est in estimators().items()}
        cases["unrolled_sampler"] = (hg.Unrolled(), sample)
        return {name: run(*cases[name]) for name in names or cases}

    # One jit per call holds several hypergradients: one XLA compile instead of several.
    dp_fn = jax.jit(all_estimators, static_argnums=(0, 3))
    # Single-process reference: the plain problem on this process's first device.
    reference = dp_fn(PROBLEM, inner, outer)
    # Every process passes the same global batch ...
    glob = dp_fn(dp, parallel.shard_batch(inner, mesh), parallel.shard_batch(outer, mesh))
    # ... or only its own rows (process p holds rows p*n/2 .. (p+1)*n/2 - 1).
    rows = lambda batch: jax.tree.map(  # noqa: E731
        lambda x: np.split(np.asarray(x), info.process_count)[info.process_index], batch
    )
    local = dp_fn(
        dp,
        parallel.shard_batch(rows(inner), mesh, process_local=True),
        parallel.shard_batch(rows(outer), mesh, process_local=True),
    )
    # Values not placed on the mesh: jit places them itself.
    plain = dp_fn(dp, inner, outer, ("unrolled",))
    errors = {}
    for kind, result in (("global", glob), ("process_local", local), ("plain", plain)):
        for name in result:
            errors[f"{name}/{kind}"] = rel_err(result[name], reference[name])
    emit(
        {
            "info": info._asdict(),
            "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
            "errors": errors,
            "grads": {k: {h: float(v) for h, v in g.items()} for k, g in glob.items()},
        }
    )


if __name__ == "__main__":
    main()
