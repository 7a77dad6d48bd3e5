"""Stochastic bilevel methods on minibatch oracles: NHGD and the baselines it is measured against.

Every method is a value (a NamedTuple of its settings) with two pure, jittable functions::

    state = method.init(params, hparams)
    state, grad, stats = method.step(problem, run, state, hparams, inner_data, outer_data, key)

``inner_data`` is a minibatch sampler ``(key, step) -> batch`` (or one batch used at every
step); ``outer_data`` a batch or ``key -> batch``. ``grad`` estimates ``∇F(λ)``. The outer
loop is the one every estimator uses, :func:`hypergrad_jax.outer.init` /
:func:`hypergrad_jax.outer.step` (``run``, an ``hg.InnerRun``, gives the inner loop: its
optimizer and number of steps), which applies any optax transformation to the
hyperparameters. ``state`` (a :class:`State`, a view of the outer state) carries what a
method keeps between outer steps: the inner iterate ``θ`` (always warm-started), the
linear-system variable ``v`` (AmIGO, SOBA, :class:`SolveAfter`) and NHGD's Fisher-inverse
state. ``stats.oracles`` counts the minibatch oracle calls of the step: gradients,
Hessian-vector products and mixed products ``∂²_{λθ} g · v`` of the inner loss, and
gradients of the outer loss.

Methods (each class cites its paper), their inner loop any ``hg.InnerRun`` (the papers use plain
SGD; SOBA must); one module per concept: :mod:`.common` (state, oracle counts, shared pieces),
:mod:`.nhgd`, :mod:`.baselines`, :mod:`.variance_reduced`:

* :class:`NHGD` (:mod:`.nhgd`): the inner loop's steps, whose gradients also update an
  online inverse ``A ≈ F̂⁻¹`` of the empirical Fisher (:mod:`hypergrad_jax.fisher`) in the
  same ``lax.scan`` ("optimize-and-approximate");
  then ``ĥ = ∇_λ f − ∂²_{λθ} g · (A ∇_θ f)``: one mixed product, no linear solve.
* :class:`SolveAfter`: the inner loop, then a stochastic linear solve of ``H v = ∇_θ f``, then
  one mixed product; with presets :func:`StocBiO` (a Neumann series on fresh minibatch
  HVPs) and :func:`AmIGO` (SGD on the linear system, ``v`` warm-started), or any
  :mod:`~hypergrad_jax.linalg` solver on one minibatch's Hessian.
* :class:`SOBA`: single loop; one step each on ``θ``, ``v`` and (by the caller) ``λ``.
* :mod:`.variance_reduced`: SOBA's loop with better directions. :class:`SABA` (SAGA tables)
  and :class:`SRBA` (a SARAH recursion with full-batch restarts) converge linearly with
  constant steps on finite sums: they take the whole ``inner_data`` / ``outer_data``
  (leading axis: samples) and draw their own minibatches; :class:`MASOBA` follows a
  moving average of the ``λ`` direction.

The inner loss must be a mean over the leading axis of the batch for the per-sample Fisher
options (each sample's gradient is the loss's gradient on a batch of one).
"""

from hypergrad_jax.stochastic.baselines import (
    SOBA,
    STOCHASTIC_SOLVERS,
    AmIGO,
    SolveAfter,
    StocBiO,
    StochasticNeumann,
    StochasticSGD,
)
from hypergrad_jax.stochastic.common import (
    Oracles,
    State,
    Stats,
)
from hypergrad_jax.stochastic.nhgd import NHGD, SAMPLE_WEIGHT_FLOOR
from hypergrad_jax.stochastic.variance_reduced import MASOBA, SABA, SRBA

METHODS = (NHGD, SolveAfter, SOBA, SABA, SRBA, MASOBA)

__all__ = [
    "AmIGO",
    "MASOBA",
    "METHODS",
    "NHGD",
    "Oracles",
    "SABA",
    "SAMPLE_WEIGHT_FLOOR",
    "SOBA",
    "SRBA",
    "STOCHASTIC_SOLVERS",
    "SolveAfter",
    "State",
    "Stats",
    "StocBiO",
    "StochasticNeumann",
    "StochasticSGD",
]
