"""hypergrad_jax: hypergradients and bilevel optimization as composable JAX functions.

import hypergrad_jax as hg
grad, info = hg.hypergradient(problem, run, hg.Implicit(), hparams, params0,
                              inner_data, outer_data)
"""

from hypergrad_jax import (
    data,
    fisher,
    linalg,
    optim,
    outer,
    parallel,
    population,
    stochastic,
    testing,
)
from hypergrad_jax.api import (
    HypergradientError,
    Info,
    Status,
    hypergradient,
    raise_if_failed,
    solve,
)
from hypergrad_jax.estimators import Forward, Greedy, Implicit, Moreau, Unrolled
from hypergrad_jax.linalg import CG, LU, Cholesky, Neumann, Richardson, SolveInfo
from hypergrad_jax.optim import InnerOptimizer, Shared
from hypergrad_jax.problem import BilevelProblem, InnerRun

__version__ = "0.1.0"

__all__ = [
    "BilevelProblem",
    "CG",
    "Cholesky",
    "Forward",
    "Greedy",
    "HypergradientError",
    "Implicit",
    "Info",
    "InnerOptimizer",
    "InnerRun",
    "LU",
    "Moreau",
    "Neumann",
    "Richardson",
    "Shared",
    "SolveInfo",
    "Status",
    "Unrolled",
    "hypergradient",
    "data",
    "fisher",
    "linalg",
    "optim",
    "outer",
    "parallel",
    "population",
    "raise_if_failed",
    "solve",
    "stochastic",
    "testing",
]
