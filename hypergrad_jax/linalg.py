"""Matrix-free linear algebra on pytrees: HVPs and solvers for ``(H + ridge I) x = b``.

Every solver is a value (a NamedTuple of options) called as
``solver(matvec, b, x0=None) -> (x, SolveInfo)``. ``matvec`` must be linear and, for
``CG`` and ``Neumann``, symmetric positive (semi-)definite; ``ridge`` adds ``ridge * x`` to
it. Solvers are not differentiated through: the implicit estimator wraps them in
``lax.custom_linear_solve``, which differentiates the *solution* instead of the iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from hypergrad_jax.static import typed

PyTree = Any


class SolveInfo(NamedTuple):
    residual: jax.Array  # float32/64[]: ||A x - b|| / ||b|| of the returned x (||A x|| when b = 0)
    iterations: jax.Array  # int32[]: matvecs used (dense solvers: the dimension)
    converged: jax.Array  # bool[]: residual <= tol, for every solver
    fell_back: jax.Array  # bool[]: the solver gave up and returned its fallback (Richardson)
    warm: Any = None  # a preconditioned solve's Warm (solution + preconditioner), else None


class Warm(NamedTuple):
    """What a preconditioned solve passes to the next one as its ``x0``: the solution (the
    warm start) and the preconditioner's state (e.g. :class:`Hutchinson`'s running
    estimate of the diagonal), so an outer loop reuses both. Every solver accepts a
    ``Warm`` as ``x0`` (those without a preconditioner use its ``x``)."""

    x: PyTree
    precond: PyTree


def initial_warm(solver, params: PyTree) -> PyTree:
    """The warm start before the first solve: zeros like ``params``, wrapped in a
    :class:`Warm` with a fresh preconditioner state when ``solver`` has a preconditioner."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    precond = getattr(solver, "precond", None)
    return zeros if precond is None else Warm(zeros, precond.init(zeros))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``Σ <a_i, b_i>`` over leaves, accumulated in at least float32.

    The solvers' tree arithmetic (this, :func:`tree_axpy`, :func:`tree_norm`) is their own
    rather than ``optax.tree``'s for dtypes: ``optax.tree.vdot`` accumulates bfloat16 leaves
    in bfloat16 (CG's ``rᵀr`` then loses the residual), and ``optax.tree.add_scale`` promotes
    a leaf to the scalar's dtype where the iterates must keep theirs. Elsewhere the library
    uses ``optax.tree``."""
    return sum(jnp.vdot(_wide(x), _wide(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y``, keeping each leaf's dtype."""
    return jax.tree.map(lambda u, v: (alpha * u + v).astype(v.dtype), x, y)


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(a, a).real)


def hvp(fun: Callable, params: PyTree, v: PyTree, *args) -> PyTree:
    """Hessian-vector product of ``fun(params, *args)`` in ``params``, forward-over-reverse."""
    return jax.jvp(lambda p: jax.grad(fun)(p, *args), (params,), (v,))[1]


def damped(matvec: Callable, ridge: float) -> Callable:
    """``v -> matvec(v) + ridge * v``."""
    if ridge == 0:
        return matvec
    return lambda v: tree_axpy(ridge, v, matvec(v))


def _wide(x):
    """``x`` in at least float32 (16-bit floats are widened; float32/64 unchanged)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def default_tol(b: PyTree) -> float:
    """The relative residual a solve of ``b``'s precision can certify, used when a solver's
    ``tol`` is ``None``: 1e-10 in float64, 1e-5 in float32, 1e-2 in 16-bit floats (the
    least precise leaf decides)."""
    eps = max(float(jnp.finfo(jnp.result_type(x)).eps) for x in jax.tree.leaves(b))
    return 1e-10 if eps < 1e-15 else 1e-5 if eps < 1e-6 else 1e-2


def _relative_residual(matvec, x, b):
    r = tree_axpy(-1.0, matvec(x), b)
    nb = tree_norm(b)
    return jnp.where(nb > 0, tree_norm(r) / jnp.where(nb > 0, nb, 1.0), tree_norm(r))


def _require(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(solver) -> None:
    """Clear errors for bad options, at the solver's first use (trace time). Options given
    as arrays (e.g. a traced ``maxiter`` swept with ``vmap``) are checked for their kind
    only: their values are not known while tracing."""
    cls = type(solver).__name__
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    for name in ("maxiter", "steps", "power_iterations", "iters"):
        if hasattr(solver, name):
            value = getattr(solver, name)
            if hasattr(value, "dtype"):
                ok = jnp.issubdtype(value.dtype, jnp.integer) and jnp.ndim(value) == 0
                _require(ok, f"{cls}.{name}", "a positive int (or an int32 scalar)", value)
            else:
                _require(_is_int(value) and value >= 1, f"{cls}.{name}", "a positive int", value)
    if number(solver.ridge):
        _require(solver.ridge >= 0, f"{cls}.ridge", "a float >= 0", solver.ridge)
    if solver.tol is not None and number(solver.tol):
        _require(solver.tol >= 0, f"{cls}.tol", "None or a float >= 0", solver.tol)
    eta = getattr(solver, "eta", None)
    if eta is not None and number(eta):
        _require(eta > 0, f"{cls}.eta", "None (automatic) or a float > 0", eta)
    if isinstance(solver, Richardson):
        _require(_is_int(solver.halvings) and solver.halvings >= 0, f"{cls}.halvings",
                 "an int >= 0", solver.halvings)  # fmt: skip
        _require(number(solver.step) and solver.step > 0, f"{cls}.step", "a float > 0",
                 solver.step)  # fmt: skip
        ok = solver.max_norm is None or (number(solver.max_norm) and solver.max_norm > 0)
        _require(ok, f"{cls}.max_norm", "None or a float > 0", solver.max_norm)


def _solve(solver, iterate, matvec, b, x0):
    """The skeleton every solver shares: validate the options, iterate in at least float32
    (``iterate(matvec, b, x0, tol) -> (x, matvecs)``, the operator applied in its own
    precision), return ``x`` in ``b``'s dtypes and check the tolerance on that returned
    ``x`` with one more matvec, in the precision the result is used in."""
    _check_options(solver)
    x0 = x0.x if isinstance(x0, Warm) else x0
    tol = default_tol(b) if solver.tol is None else solver.tol
    narrow = lambda v: jax.tree.map(lambda u, like: u.astype(jnp.result_type(like)), v, b)  # noqa: E731
    wide_matvec = lambda v: jax.tree.map(_wide, matvec(narrow(v)))  # noqa: E731
    wide = lambda v: None if v is None else jax.tree.map(_wide, v)  # noqa: E731
    x, matvecs, *fell_back = iterate(wide_matvec, wide(b), wide(x0), tol)
    x = narrow(x)
    residual = _relative_residual(matvec, x, b)
    fell_back = jnp.asarray(fell_back[0] if fell_back else False)
    return x, SolveInfo(residual, jnp.asarray(matvecs, jnp.int32), residual <= tol, fell_back)


def _call(self, matvec, b, x0=None):
    """Solves ``(matvec + ridge I) x = b``; returns ``(x, SolveInfo)``."""
    return self.run(damped(matvec, self.ridge), b, x0)


class HutchinsonState(NamedTuple):
    total: PyTree  # Σ over probes of z ⊙ A z (like x, at least float32), older ones decayed
    count: jax.Array  # float32[]: the (decayed) number of probes in ``total``
    solves: jax.Array  # int32[]: solves so far (seeds each solve's probes)


@typed
class Hutchinson(NamedTuple):
    """A diagonal (Jacobi) preconditioner from Hutchinson's estimator of ``diag(A)``:
    ``E[z ⊙ A z] = diag(A)`` for Rademacher ``z`` (Bekas, Kokiopoulou, Saad 2007).

    Each solve adds ``probes`` probes (that many matvecs, one batched call, counted in
    ``SolveInfo.iterations``) to a running estimate whose older probes are weighted by
    ``memory`` per solve: in an outer loop the operator changes slowly, so the estimate
    sharpens across steps at a constant cost per step (pass the returned
    ``info.adjoint``, a :class:`Warm`, back as the warm start; :func:`hg.outer.step`
    does). The estimate ``|d|`` is floored at ``floor · mean|d|`` (no entry can blow the
    preconditioner up) and shrunk in log space towards its geometric mean ``m`` with the
    weight of ``prior`` probes: ``d̃ = |d|^w m^(1−w)``, ``w = n / (n + prior)`` after ``n``
    (decayed) probes, so a young, noisy estimate preconditions partially (``D^(-w)``, which
    takes the condition number ``κ`` of a diagonal to ``κ^(1−w)``).

    Where it pays: operators whose diagonal varies over orders of magnitude (per-feature or
    per-layer penalties, badly scaled features); on a near-isotropic operator it costs its
    probes and saves little.
    """

    probes: int = 4
    memory: float = 0.9
    prior: float = 8.0
    floor: float = 1e-2

    def check(self) -> None:
        _require(_is_int(self.probes) and self.probes >= 1, "Hutchinson.probes",
                 "a positive int", self.probes)  # fmt: skip
        ok = isinstance(self.memory, (int, float)) and 0 <= self.memory < 1
        _require(ok, "Hutchinson.memory", "a float in [0, 1)", self.memory)
        ok = isinstance(self.prior, (int, float)) and self.prior >= 0
        _require(ok, "Hutchinson.prior", "a float >= 0", self.prior)
        ok = isinstance(self.floor, (int, float)) and 0 < self.floor <= 1
        _require(ok, "Hutchinson.floor", "a float in (0, 1]", self.floor)

    def init(self, like: PyTree) -> HutchinsonState:
        total = jax.tree.map(lambda x: jnp.zeros_like(_wide(x)), like)
        return HutchinsonState(total, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    def update(self, matvec: Callable, state: HutchinsonState, like: PyTree) -> HutchinsonState:
        """Adds this solve's probes of ``matvec`` (a batch of ``probes`` matvecs)."""
        leaves, treedef = jax.tree.flatten(like)
        keys = jax.random.split(jax.random.fold_in(jax.random.key(0), state.solves), len(leaves))
        z = treedef.unflatten(
            [
                jax.random.rademacher(k, (self.probes, *jnp.shape(x)), jnp.result_type(x))
                for k, x in zip(keys, leaves)
            ]
        )
        az = jax.vmap(matvec)(z)
        probe = jax.tree.map(lambda u, v: jnp.sum(_wide(u) * _wide(v), 0), z, az)
        total = jax.tree.map(lambda t, p: (self.memory * t + p).astype(t.dtype), state.total, probe)
        count = self.memory * state.count + self.probes
        return HutchinsonState(total, count, state.solves + 1)

    def inverse(self, state: HutchinsonState) -> PyTree:
        """``d̃⁻¹``: the estimate ``|d|``, floored at ``floor · mean|d|``, shrunk in log space
        towards its geometric mean ``m``: ``d̃ = |d|^w m^(1−w)``, ``w = n / (n + prior)``."""
        d = jax.tree.map(lambda t: jnp.abs(t) / state.count, state.total)
        size = sum(x.size for x in jax.tree.leaves(d))
        mean = sum(jnp.sum(x) for x in jax.tree.leaves(d)) / size
        low = self.floor * jnp.where(mean > 0, mean, 1.0)
        logs = jax.tree.map(lambda x: jnp.log(jnp.maximum(x, low)), d)
        log_gm = sum(jnp.sum(x) for x in jax.tree.leaves(logs)) / size
        w = state.count / (state.count + self.prior)
        return jax.tree.map(lambda x: jnp.exp(-(w * x + (1 - w) * log_gm)), logs)


@typed
class CG(NamedTuple):
    """Conjugate gradient for symmetric positive definite ``H + ridge I``.

    The default for implicit differentiation: it needs only HVPs and converges in
    ``O(sqrt(cond))`` iterations. Stops when ``||r|| <= tol * ||b||`` or after ``maxiter``;
    ``converged`` is that test on the *returned* solution's true residual (one more matvec),
    not on CG's recursively updated one, which drifts from it in low precision.

    ``precond``: ``None``, or a preconditioner value (:class:`Hutchinson`: a diagonal
    estimated from matvecs and reused across solves): preconditioned CG then converges in
    ``O(sqrt(cond(M⁻¹A)))`` iterations. Its state travels with the solution in
    ``SolveInfo.warm`` (a :class:`Warm`); pass it back as ``x0`` to reuse it. The stopping
    test stays on the unpreconditioned residual, so the accuracy does not depend on it.

    Precision: the iteration runs in at least float32 (16-bit vectors are widened, the
    operator sees its own dtype), and the tolerance is checked on the result in its own
    dtype. ``tol=None`` picks :func:`default_tol` from ``b``'s dtype (1e-10 float64, 1e-5
    float32, 1e-2 16-bit): a bfloat16 solution cannot certify 1e-10, and says so.
    """

    maxiter: int = 100
    tol: float | None = None
    ridge: float = 0.0
    precond: Any = None

    __call__ = _call

    def run(self, matvec, b, x0=None):
        """Solves ``matvec(x) = b`` (``matvec`` already damped)."""
        if self.precond is None:
            return _solve(self, self._iterate, matvec, b, x0)
        if not isinstance(self.precond, Hutchinson):
            raise TypeError(
                f"CG.precond: expected None or hg.linalg.Hutchinson(...), got "
                f"{type(self.precond).__name__}"
            )
        self.precond.check()
        fresh = not isinstance(x0, Warm)
        state = self.precond.init(b) if fresh else x0.precond
        state = self.precond.update(matvec, state, b)
        inverse = self.precond.inverse(state)
        iterate = lambda *args: self._iterate(*args, inverse=inverse)  # noqa: E731
        x, info = _solve(self, iterate, matvec, b, x0)
        iterations = info.iterations + self.precond.probes
        return x, info._replace(iterations=iterations, warm=Warm(x, state))

    def _iterate(self, matvec, b, x0, tol, inverse=None):
        scale = (
            (lambda r: r) if inverse is None else (lambda r: jax.tree.map(jnp.multiply, inverse, r))
        )  # noqa: E731
        x = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0
        r = tree_axpy(-1.0, matvec(x), b)
        bound = (tol * tree_norm(b)) ** 2

        def cond(c):
            _, _, _, _, rr, k = c
            return (rr > bound) & (k < self.maxiter)

        def body(c):
            x, r, p, rz, _, k = c
            ap = matvec(p)
            alpha = rz / tree_vdot(p, ap)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            z = scale(r)
            rz_new = tree_vdot(r, z)
            p = tree_axpy(rz_new / rz, p, z)
            return x, r, p, rz_new, tree_vdot(r, r), k + 1

        z = scale(r)
        init = (x, r, z, tree_vdot(r, z), tree_vdot(r, r), jnp.int32(0))
        x, *_, k = jax.lax.while_loop(cond, body, init)
        return x, k


@typed
class Neumann(NamedTuple):
    """Truncated Neumann series ``x = eta * sum_{j<steps} (I - eta A)^j b`` (+ ``x0`` term).

    Converges only when ``0 < eta < 2 / lambda_max(A)``: above that the series *diverges*
    (a step of 1 on a Hessian with eigenvalues up to 3.8 multiplies the error by 2.8 per
    term). With ``steps`` terms the error contracts like ``(1 - eta * lambda_min)^steps``.
    The solver stocBiO uses.

    ``eta=None`` (the default) is safe: ``eta = 1 / lambda_hat`` with ``lambda_hat`` from
    ``power_iterations`` power iterations on the initial residual (that many more matvecs,
    counted in ``iterations``). Power iteration approaches ``lambda_max`` from below, and
    the series converges as long as ``lambda_hat > lambda_max / 2``; the estimate is the
    largest eigenvalue present in the residual, which is what the series is applied to.
    A diverging or unfinished series is never reported converged: ``converged`` is the
    residual test ``||A x - b|| <= tol ||b||`` on the result (``tol=None``:
    :func:`default_tol`), so it surfaces as ``Status.SOLVE_NOT_CONVERGED``.
    """

    steps: int = 50
    eta: float | None = None
    ridge: float = 0.0
    tol: float | None = None
    power_iterations: int = 10

    __call__ = _call

    def run(self, matvec, b, x0=None):
        return _solve(self, self._iterate, matvec, b, x0)

    def _iterate(self, matvec, b, x0, tol):
        del tol  # a fixed number of terms; the tolerance is checked on the result
        # Richardson iteration x <- x + eta (b - A x): from x0 = 0 its k-th iterate is the
        # k-term Neumann series, and a warm start x0 is used as given.
        x = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0
        eta, matvecs = self.eta, self.steps
        if eta is None:
            r0 = b if x0 is None else tree_axpy(-1.0, matvec(x), b)
            eta = 1.0 / _largest_eigenvalue(matvec, r0, self.power_iterations)
            matvecs += self.power_iterations + (x0 is not None)

        def body(_, x):
            return tree_axpy(eta, tree_axpy(-1.0, matvec(x), b), x)

        return jax.lax.fori_loop(0, self.steps, body, x), matvecs


@typed
class Richardson(NamedTuple):
    """Truncated Richardson iteration with step halving and a fallback: ResAlign's solver (Li
    et al., NeurIPS 2025), the fixed-point method of Grazzi et al. (ICML 2020) on the
    proximal map.

    An attempt with step ``a`` returns ``x = a Σ_{k<iters} (I − aA)^k b`` (``iters`` steps of
    ``x ← x + a (b − A x)`` from 0). It fails when a step amplifies the series' term
    (``||(I − aA) u|| > ||u||``: the series diverges at this ``a``) or when ``||x||`` exceeds
    ``max_norm``; then ``a`` is halved and the attempt restarted, at most ``halvings`` times.
    After the last failure ``x = 0`` with ``SolveInfo.fell_back`` set: the hypergradient is
    then the direct gradient ``∂_λ f`` alone (the authors' fallback), reported as
    ``Status.SOLVE_FELL_BACK``, never silently. ``converged`` is the residual test on the
    result, as for every solver (a truncated series usually does not pass a tight ``tol``).
    A warm start ``x0`` is ignored: the series starts from 0.
    """

    iters: int = 5
    step: float = 1.0
    halvings: int = 5
    max_norm: float | None = None
    ridge: float = 0.0
    tol: float | None = None

    __call__ = _call

    def run(self, matvec, b, x0=None):
        return _solve(self, self._iterate, matvec, b, x0)

    def _iterate(self, matvec, b, x0, tol):
        del x0, tol

        def attempt(a):
            def term(_, carry):
                u, total, failed = carry
                nxt = tree_axpy(-a, matvec(u), u)  # (I − aA) u
                return nxt, tree_axpy(1.0, nxt, total), failed | (tree_norm(nxt) > tree_norm(u))

            init = (b, b, jnp.zeros((), bool))
            _, total, failed = jax.lax.fori_loop(0, self.iters - 1, term, init)
            x = jax.tree.map(lambda t: a * t, total)
            if self.max_norm is not None:
                failed = failed | (tree_norm(x) > self.max_norm)
            return x, failed

        def retry(carry):
            j, _, _ = carry
            x, failed = attempt(self.step * 0.5 ** j.astype(jnp.result_type(float)))
            return j + 1, x, failed

        zeros = jax.tree.map(jnp.zeros_like, b)
        init = (jnp.zeros((), jnp.int32), zeros, jnp.ones((), bool))
        tries, x, failed = jax.lax.while_loop(lambda c: c[2] & (c[0] <= self.halvings), retry, init)
        x = jax.tree.map(lambda v, z: jnp.where(failed, z, v), x, zeros)
        return x, tries * (self.iters - 1), failed


def _largest_eigenvalue(matvec, v, iterations):
    """``||A v_k||`` after ``iterations`` power iterations from ``v`` (1.0 when ``v = 0``,
    where any step is as good as another)."""

    def normalise(v):
        n = tree_norm(v)
        return jax.tree.map(lambda x: x / jnp.where(n > 0, n, 1.0), v), n

    def body(_, carry):
        v, _ = carry
        return normalise(matvec(v))

    v, n = normalise(v)
    _, lam = jax.lax.fori_loop(0, iterations, body, (v, n))
    return jnp.where(lam > 0, lam, 1.0)


def _dense_iterate(dense_solve):
    """Materialises ``matvec`` as a matrix (``n`` matvecs) and applies ``dense_solve``."""

    def iterate(matvec, b, x0, tol):
        del x0, tol
        flat_b, unravel = ravel_pytree(b)
        mat = jax.jacfwd(lambda f: ravel_pytree(matvec(unravel(f)))[0])(flat_b)
        return unravel(dense_solve(mat, flat_b)), flat_b.size

    return iterate


@typed
class Cholesky(NamedTuple):
    """Dense Cholesky solve: materialises ``A`` with ``n`` matvecs. Small problems only.
    ``converged`` is the residual test (``tol=None``: :func:`default_tol`); an indefinite
    ``A`` gives NaN and is not converged."""

    ridge: float = 0.0
    tol: float | None = None

    __call__ = _call

    def run(self, matvec, b, x0=None):
        cho = lambda m, f: jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m), f)  # noqa: E731
        return _solve(self, _dense_iterate(cho), matvec, b, x0)


@typed
class LU(NamedTuple):
    """Dense LU solve for non-symmetric or indefinite ``A``. Small problems only.
    ``converged`` is the residual test (``tol=None``: :func:`default_tol`)."""

    ridge: float = 0.0
    tol: float | None = None

    __call__ = _call

    def run(self, matvec, b, x0=None):
        return _solve(self, _dense_iterate(jnp.linalg.solve), matvec, b, x0)
