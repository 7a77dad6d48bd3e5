"""Option values as static jit keys: different types with equal fields never share a program."""

import itertools

import jax
import pytest
from problems import tour_problem

import hypergrad_jax as hg
from hypergrad_jax import api, stochastic
from hypergrad_jax.fisher import DenseFisher, KFACFisher
from hypergrad_jax.static import Static, typed_key

OPTION_TYPES = [
    hg.CG,
    hg.Neumann,
    hg.Cholesky,
    hg.LU,
    hg.Richardson,
    hg.Unrolled,
    hg.Forward,
    hg.Implicit,
    hg.Moreau,
    hg.InnerRun,
    hg.BilevelProblem,
    hg.InnerOptimizer,
    DenseFisher,
    stochastic.NHGD,
    stochastic.StochasticNeumann,
    stochastic.StochasticSGD,
    stochastic.SOBA,
    stochastic.SolveAfter,
    KFACFisher,
    hg.population.Perturb,
    hg.population.Resample,
    hg.population.Gaussian,
    hg.population.Teacher,
    hg.population.Transform,
    hg.population.NoHypergradient,
]


SAME_ARITY = [
    (a, b) for a, b in itertools.combinations(OPTION_TYPES, 2) if len(a._fields) == len(b._fields)
]


@pytest.mark.parametrize("a,b", SAME_ARITY, ids=lambda t: t.__name__)
def test_equal_fields_of_different_types_are_different_keys(a, b):
    x, y = a._make(range(len(a._fields))), b._make(range(len(b._fields)))
    assert tuple(x) == tuple(y)  # as plain tuples they are equal: the trap
    assert x != y and not (x == y)
    assert Static(x) != Static(y)
    # Nested one level down (an estimator holding a solver) as well.
    assert Static(hg.Implicit(x)) != Static(hg.Implicit(y))
    assert hg.Implicit(x) != hg.Implicit(y)


def test_same_type_and_fields_is_one_key():
    assert hg.Implicit(hg.CG(20, 0.5)) == hg.Implicit(hg.CG(20, 0.5))
    assert hash(hg.Implicit(hg.CG(20, 0.5))) == hash(hg.Implicit(hg.CG(20, 0.5)))
    assert Static(hg.Implicit(hg.CG(20, 0.5))) == Static(hg.Implicit(hg.CG(20, 0.5)))
    # A bool is not an int, an int is not a float, at any depth.
    assert typed_key(hg.Unrolled(remat=True)) != typed_key(hg.Unrolled(remat=1))
    assert Static((hg.CG(20, 0.5),)) != Static((hg.CG(20.0, 0.5),))


@pytest.mark.parametrize("cg_first", [True, False])
def test_cg_and_neumann_with_equal_fields_get_their_own_programs(cg_first):
    # The reported bug: Implicit(CG(20, 0.5, 0.0)) and Implicit(Neumann(20, 0.5, 0.0)) were
    # one cache entry, so the second ran the first one's solver. Each result is checked
    # against its own solver called directly on the same system (an independent path).
    problem, run, hparams, params0, train, val = tour_problem()
    solvers = [hg.CG(20, 0.5, 0.0), hg.Neumann(20, 0.5, 0.0)]
    before = api._hypergradient._cache_size()
    infos = {}
    for solver in solvers if cg_first else solvers[::-1]:
        _, info = hg.hypergradient(problem, run, hg.Implicit(solver), hparams, params0, train, val)
        infos[type(solver)] = info
    assert api._hypergradient._cache_size() - before in (0, 2)  # 0: both cached already
    theta = infos[hg.CG].params
    b = jax.grad(problem.outer_loss)(theta, hparams, val)
    hvp = lambda v: hg.linalg.hvp(problem.inner_loss, theta, v, hparams, train)  # noqa: E731
    for solver in solvers:
        _, direct = solver(hvp, b)
        assert int(infos[type(solver)].solve.iterations) == int(direct.iterations)
    assert int(infos[hg.Neumann].solve.iterations) == 20
    assert int(infos[hg.CG].solve.iterations) < 20  # tol 0.5: CG stops after a step or two


def test_user_jit_with_static_options_is_safe():
    # jax.jit's own cache keys static arguments by __hash__/__eq__: our options carry
    # their type there too.
    problem, run, hparams, params0, train, val = tour_problem()
    jitted = jax.jit(hg.hypergradient, static_argnums=(0, 1, 2))
    _, a = jitted(problem, run, hg.Implicit(hg.CG(20, 0.5, 0.0)), hparams, params0, train, val)
    _, b = jitted(problem, run, hg.Implicit(hg.Neumann(20, 0.5, 0.0)), hparams, params0, train, val)
    assert int(b.solve.iterations) == 20 and int(a.solve.iterations) < 20
