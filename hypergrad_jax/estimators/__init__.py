"""Hypergradient estimators: each is a value that chooses the loop and the derivative rule.

Every estimator has ``solution(problem, run, hparams, params0, inner_data, key) -> θ_T``
(differentiable by its rule) and ``grad(...)`` used by :func:`hypergrad_jax.hypergradient`.
"""

from hypergrad_jax.estimators.implicit import Implicit, Moreau
from hypergrad_jax.estimators.unrolled import Forward, Greedy, Unrolled

__all__ = ["Forward", "Greedy", "Implicit", "Moreau", "Unrolled"]
