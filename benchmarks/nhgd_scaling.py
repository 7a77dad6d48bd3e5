"""NHGD's regime map: time per outer step and hypergradient accuracy against CG, Neumann and
stocBiO, over parameter count, conditioning and inner steps; where (if anywhere) NHGD gets a
hypergradient of a given accuracy in less time than the best baseline.

Family (synthetic, generated). Multi-output linear regression, one flax ``nn.Dense``: width
``w`` has ``w`` features and ``w`` outputs, ``|θ| = w (w + 1)`` (w = 32, 100, 316: 1.1e3,
1.0e4, 1.0e5). Features ``x = z diag(s) Qᵀ`` (``z`` standard normal, ``Q`` a random
rotation, ``s²`` geometric from 1 to ``1/κ``): ``κ`` is the feature covariance's condition
number. Targets ``y = z V + ε``, ``ε ~ N(0, I)``: the inner loss
``g(θ, λ) = mean ½|y − x W − b|² + ½ Σ_k e^{λ_k} |W_k|² + ½ ρ |b|²`` is a well-specified
Gaussian negative log-likelihood plus a per-feature ridge, so the Fisher is the Hessian's
surrogate NHGD assumes, and the Hessian ``(X̄ᵀX̄/N + R) ⊗ I`` does not depend on ``θ``
(its conditioning is κ's, capped by the ridge; the map's y axis is the CG iterations an
accurate full-data solve needs). ``λ`` is held at ``log ρ``, ``ρ = 1e-4``. Outer loss: the
same squared error on a validation set (its full batch: no outer noise). Since ``λ`` is a
ridge, the mixed product ``∂²_{λθ} g · v`` does not depend on the minibatch: a
hypergradient's error is its linear solve's (or Fisher inverse's) alone. The exact
hypergradient at ``(θ, λ)`` is one ``(w+1) × (w+1)`` float64 solve.

Methods, all on the same inner loop (``T`` SGD steps on minibatches of 128, step
``1/λ_max`` of the minibatch Hessians, ``θ`` warm-started; the same PRNG keys, so the same
``θ`` trajectory):

* ``nhgd_kfac``: ``NHGD(KFACFisher(inverse="solve", damping=ρ), per_sample_grads=
  "flax_dense")``: Kronecker factors from one forward + one backward per inner step,
  ``(Ā ⊗ S + ρI)⁻¹`` per hypergradient; ``nhgd_kfac_online``: the online (Woodbury) inverses,
  whose prior decays (no constant ridge); ``nhgd_kfac_vmap``: the online inverses with
  per-sample gradients by ``vmap`` (the library's only path before the factored one; the
  same numbers as ``nhgd_kfac_online`` but for the ridge's gradient, which ``vmap`` adds to
  every sample's); ``nhgd_dense``: ``DenseFisher(samples="woodbury",
  inverse="solve", damping=ρ)`` with factored per-sample gradients (|θ| ≤ 2000). EMA
  ``β = 0.99``, state carried across outer steps.
* ``cg``: ``SolveAfter(hg.linalg.CG(maxiter=Q, tol=1e-6))``: up to ``Q`` HVPs on one
  minibatch's Hessian, warm-started; ``neumann``: ``SolveAfter(hg.linalg.Neumann(Q, η))``,
  warm-started; ``stocbio``: ``StocBiO(Q, η)``, a fresh minibatch per term; ``η`` = the
  inner step (tuned: ``1/λ_max`` of the minibatch Hessians). ``cg_full``: CG on the *full*
  training set's Hessian (``N/B`` minibatch HVPs per iteration), warm-started: the
  optimize-then-approximate baseline without minibatch noise in its solve. ``Q`` over a
  grid.

Measurement. Per cell (width, κ, T): ``θ`` starts at the exact inner solution; every method
runs ``warmup`` outer steps (enough for 60 Fisher updates) and ``measured`` ones (``λ``
fixed, the same keys), each one compiled call (compiled ahead of time; compilation
excluded) timed with ``block_until_ready``, then the last step is re-timed until ~0.25 s
(at most 10 more). Time per outer step: the median of all those calls (their minimum is
recorded too: the machine is shared). Cosine: the mean over the measured steps of the
cosine between the method's hypergradient and the exact one at the same ``(θ_T, λ)``.
Time to a target cosine ``c``: a method's least time per outer step over its grid points
whose cosine reaches ``c`` (none if no point does). The map: NHGD's best variant's time to
``c`` over the best baseline's.

Nothing is asserted; it writes ``nhgd_scaling.{json,md,png}`` under ``benchmarks/results``.

Run:  python benchmarks/nhgd_scaling.py          # ~4 minutes on 2 cores
      python benchmarks/nhgd_scaling.py --quick  # smoke test: two small widths
      --out DIR writes the results there instead.
"""

from __future__ import annotations

import os

# One thread per op (XLA's and LAPACK's, i.e. OpenBLAS's), for every method alike: on a
# shared machine with more runnable processes than cores, multi-threaded ops wait for
# descheduled pool threads (measured here: the same compiled K-FAC step at 150 ms instead of
# 0.5 ms, a dense-Fisher step at 1.2 s instead of 13 ms). Set before JAX and NumPy start.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package, when run as a script

import hypergrad_jax as hg  # noqa: E402
from benchmarks.estimators import machine  # noqa: E402
from hypergrad_jax import stochastic as st  # noqa: E402
from hypergrad_jax.fisher import DenseFisher, KFACFisher, flax_dense_layers  # noqa: E402
from hypergrad_jax.stochastic import common as sc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

RIDGE = 1e-4  # ρ: e^λ at the measured point, and the bias's ridge
BETA = 0.99  # NHGD's EMA factor
BATCH = 128
FISHER_UPDATES = 60  # warm-up: enough outer steps for this many inner (Fisher) steps
TARGETS = (0.9, 0.99)  # cosines the time-to-accuracy ratios are reported at
DENSE_MAX = 2000  # nhgd_dense only up to this many parameters
RETIME_S = 0.25  # re-time the last step until about this long (at most RETIME_MAX calls)
RETIME_MAX = 10
CG_TOL = 1e-6  # the CG baselines stop there or at Q iterations, whichever comes first

FULL = dict(
    widths=(32, 100, 178, 316),
    kappas=(1.0, 1e2, 1e3, 1e4),
    steps=10,  # T of the map
    sweep=(100, (3, 30)),  # the inner-steps axis: (width, more T values)
    qs=(2, 5, 20, 80),
    full_qs=(2, 5, 20),
    n_train=2048,
    n_val=1024,
    measured=3,
)
QUICK = dict(
    widths=(16, 32),
    kappas=(1.0, 1e2),
    steps=5,
    sweep=None,
    qs=(5, 20),
    full_qs=(5,),
    n_train=512,
    n_val=256,
    measured=1,
)


# ----------------------------------------------------------------------------- the family


class Data(NamedTuple):
    train: dict  # {"x": float32[N, w], "y": float32[N, w]}
    val: dict
    gram: np.ndarray  # float64[w+1, w+1]: X̄ᵀX̄/N of the training set (the Hessian's factor)


def make_data(width: int, kappa: float, n_train: int, n_val: int, seed: int = 0) -> Data:
    """The width-``w``, condition-``κ`` member of the family (module docstring)."""
    d = width
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scale = kappa ** (-0.5 * np.arange(d) / max(d - 1, 1))  # std: variances 1 .. 1/κ
    teacher = rng.normal(size=(d, d)) / np.sqrt(d)

    def split(n):
        z = rng.normal(size=(n, d))
        y = z @ teacher + rng.normal(size=(n, d))
        x = (z * scale) @ rotation.T
        return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}

    train, val = split(n_train), split(n_val)
    xbar = _augment(np.asarray(train["x"], np.float64))
    return Data(train, val, xbar.T @ xbar / n_train)


def _augment(x):
    return np.concatenate([x, np.ones_like(x[:, :1])], axis=1)


def make_problem(width: int):
    """The bilevel problem, ``θ = 0`` and ``λ = log ρ`` for width ``w``."""
    model = nn.Dense(width)

    def predict(params, x):
        return model.apply({"params": params}, x)

    def squared_error(params, batch):
        return 0.5 * jnp.mean(jnp.sum((batch["y"] - predict(params, batch["x"])) ** 2, axis=1))

    def inner(params, hparams, batch):
        w, b = params["kernel"], params["bias"]
        ridge = jnp.sum(jnp.exp(hparams["log_ridge"]) * jnp.sum(w * w, axis=1))
        return squared_error(params, batch) + 0.5 * ridge + 0.5 * RIDGE * jnp.sum(b * b)

    problem = hg.BilevelProblem(inner, lambda p, h, b: squared_error(p, b))
    params = jax.tree.map(
        jnp.zeros_like, model.init(jax.random.key(0), jnp.zeros((1, width)))["params"]
    )
    hparams = {"log_ridge": jnp.full((width,), math.log(RIDGE), jnp.float32)}
    return problem, params, hparams


def ridge_matrix(hparams) -> np.ndarray:
    """``R = diag(e^λ, ρ)`` (the bias row last)."""
    return np.diag(np.append(np.exp(np.asarray(hparams["log_ridge"], np.float64)), RIDGE))


def exact_solution(data: Data, hparams) -> dict:
    """``θ*(λ)``: ``W̄ = (X̄ᵀX̄/N + R)⁻¹ X̄ᵀY/N`` (float64)."""
    xbar = _augment(np.asarray(data.train["x"], np.float64))
    n = xbar.shape[0]
    wbar = np.linalg.solve(
        data.gram + ridge_matrix(hparams), xbar.T @ np.asarray(data.train["y"]) / n
    )
    return {
        "kernel": jnp.asarray(wbar[:-1], jnp.float32),
        "bias": jnp.asarray(wbar[-1], jnp.float32),
    }


def exact_hypergradient(problem, data: Data, params, hparams):
    """``h* = ∇_λ f − ∂²_{λθ} g · H⁻¹ ∇_θ f`` at ``(θ, λ)``, ``H = (X̄ᵀX̄/N + R) ⊗ I`` of the
    full training set: one float64 solve with the ``(w+1) × (w+1)`` factor."""
    f_theta, f_lambda = jax.grad(problem.outer_loss, argnums=(0, 1))(params, hparams, data.val)
    rhs = np.concatenate(
        [np.asarray(f_theta["kernel"], np.float64), np.asarray(f_theta["bias"], np.float64)[None]]
    )
    v = np.linalg.solve(data.gram + ridge_matrix(hparams), rhs)
    v = {"kernel": jnp.asarray(v[:-1], jnp.float32), "bias": jnp.asarray(v[-1], jnp.float32)}
    _, mixed = jax.vjp(lambda h: jax.grad(problem.inner_loss)(params, h, data.train), hparams)
    return jax.tree.map(lambda a, b: a - b, f_lambda, mixed(v)[0])


def cg_iterations(data: Data, hparams, rhs: np.ndarray, tol=1e-3, maxiter=5000) -> int:
    """Iterations of plain CG on the full-data Hessian (the Kronecker factor acts on every
    output column at once, which is CG on ``H`` itself) to relative residual ``tol``."""
    a = data.gram + ridge_matrix(hparams)
    x = np.zeros_like(rhs)
    r = rhs.copy()
    p, rr, bound = r.copy(), np.sum(r * r), tol**2 * np.sum(rhs * rhs)
    for k in range(maxiter):
        if rr <= bound:
            return k
        ap = a @ p
        alpha = rr / np.sum(p * ap)
        x, r = x + alpha * p, r - alpha * ap
        rr, rr_old = np.sum(r * r), rr
        p = r + rr / rr_old * p
    return maxiter


def minibatch_lambda_max(data: Data, hparams, samples: int = 20, seed: int = 1) -> float:
    """The largest eigenvalue of ``X̄_BᵀX̄_B/B + R`` over ``samples`` random minibatches."""
    rng = np.random.default_rng(seed)
    xbar = _augment(np.asarray(data.train["x"], np.float64))
    out = 0.0
    for _ in range(samples):
        rows = xbar[rng.choice(xbar.shape[0], BATCH, replace=False)]
        out = max(out, np.linalg.eigvalsh(rows.T @ rows / BATCH + ridge_matrix(hparams))[-1])
    return float(out)


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def cosine(a, b) -> float:
    a, b = _flat(a), _flat(b)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300)
    return float(np.clip(cos, -1.0, 1.0))  # rounding can leave |cos| a hair above 1


# ----------------------------------------------------------------------------- methods


class FullBatchCG(NamedTuple):
    """The same inner loop, then CG (warm-started) on the full training set's Hessian, then
    the mixed product: optimize-then-approximate without minibatch noise in the solve."""

    maxiter: Any
    train: Any

    def init(self, params, hparams):
        return st.SolveAfter().init(params, hparams)

    def step(self, problem, run, state, hparams, inner_data, outer_data, key):
        k_inner, _, _ = sc.split_keys(key)
        params = sc.inner_loop(problem, run, hparams, state.params, inner_data, k_inner)
        _, f_theta, f_hparams = sc.outer_gradients(problem, params, hparams, outer_data)
        hvp = sc.hvp_operator(problem, params, hparams, self.train)
        v, _ = hg.linalg.CG(maxiter=self.maxiter, tol=CG_TOL)(hvp, f_theta, state.adjoint)
        grad, _ = sc.mixed_hypergradient(problem, params, hparams, self.train, v, f_hparams)
        return st.State(params, v, (), state.step + 1), grad, None


def methods(params, cfg) -> dict:
    """``name -> (build(q, η, train) -> method, knob values, q traced?)`` for this width."""
    layers = flax_dense_layers(params)
    size = sum(x.size for x in jax.tree.leaves(params))
    kfac = lambda inverse: KFACFisher(layers, "ema", BETA, RIDGE, inverse)  # noqa: E731
    fast = dict(per_sample_grads="flax_dense")
    out = {
        "nhgd_kfac": (lambda q, eta, train: st.NHGD(kfac("solve"), **fast), (0,), True),
        "nhgd_kfac_online": (lambda q, eta, train: st.NHGD(kfac("online"), **fast), (0,), True),
    }
    out["nhgd_kfac_vmap"] = (lambda q, eta, train: st.NHGD(kfac("online")), (0,), True)
    if size <= DENSE_MAX:
        dense = DenseFisher("ema", BETA, RIDGE, "woodbury", "solve")
        out["nhgd_dense"] = (lambda q, eta, train: st.NHGD(dense, **fast), (0,), True)
    qs = cfg["qs"]
    cg = lambda q: hg.linalg.CG(maxiter=q, tol=CG_TOL)  # noqa: E731
    out["cg"] = (lambda q, eta, train: st.SolveAfter(cg(q)), qs, True)
    out["cg_full"] = (lambda q, eta, train: FullBatchCG(q, train), cfg["full_qs"], True)
    out["neumann"] = (
        lambda q, eta, train: st.SolveAfter(hg.linalg.Neumann(steps=q, eta=eta)),
        qs,
        True,
    )
    out["stocbio"] = (lambda q, eta, train: st.StocBiO(q, eta), qs, False)
    return out


def is_nhgd(name: str) -> bool:
    return name.startswith("nhgd")


class Stepper:
    """Compiled outer steps of one width, cached by (method, T, static knob); the data,
    ``λ``, the inner step size, ``η`` and traced knobs are arguments, so every κ reuses
    them."""

    def __init__(self, problem):
        self.problem, self.cache, self.compile_s = problem, {}, 0.0

    def get(self, name, build, traced, q, steps, args):
        key = (name, steps, None if traced else q)
        if key not in self.cache:
            problem = self.problem

            def step(state, hparams, key, train, val, lr, eta, qarg):
                run = hg.InnerRun(hg.optim.sgd(), steps, lambda h: {"lr": lr})
                sampler = hg.data.minibatch_sampler(train, BATCH)
                method = build(qarg if traced else q, eta, train)
                state, grad, _ = method.step(problem, run, state, hparams, sampler, val, key)
                return state, grad

            t0 = time.perf_counter()
            self.cache[key] = jax.jit(step).lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        return self.cache[key]


def run_method(stepper, name, spec, q, steps, state, hparams, data, lr, warmup, measured):
    """``warmup + measured`` outer steps, then re-timing of the last: per-call seconds, and
    the measured steps' hypergradients and inner iterates."""
    build, _, traced = spec
    consts = (data.train, data.val, jnp.float32(lr), jnp.float32(lr), jnp.int32(q))
    args = (state, hparams, jax.random.key(0), *consts)
    compiled = stepper.get(name, build, traced, q, steps, args)
    times, grads, thetas = [], [], []
    for k in range(warmup + measured):
        before = state
        t0 = time.perf_counter()
        state, grad = compiled(state, hparams, jax.random.key(k + 1), *consts)
        jax.block_until_ready((state, grad))
        times.append(time.perf_counter() - t0)
        if k >= warmup:
            grads.append(grad)
            thetas.append(state.params)
    last = jax.random.key(warmup + measured)
    for _ in range(min(RETIME_MAX, int(RETIME_S / max(min(times), 1e-6)))):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(before, hparams, last, *consts))
        times.append(time.perf_counter() - t0)
    return times, grads, thetas


# ----------------------------------------------------------------------------- one cell


def cell(width, kappa, steps_list, cfg, stepper) -> list[dict]:
    """Every method at ``(width, κ)`` for each ``T`` in ``steps_list``: one row each."""
    problem, params0, hparams = stepper.problem_info
    data = make_data(width, kappa, cfg["n_train"], cfg["n_val"])
    theta = exact_solution(data, hparams)
    f_theta = jax.grad(problem.outer_loss)(theta, hparams, data.val)
    rhs = np.concatenate([np.asarray(f_theta["kernel"]), np.asarray(f_theta["bias"])[None]])
    iterations = cg_iterations(data, hparams, rhs.astype(np.float64))
    eigs = np.linalg.eigvalsh(data.gram + ridge_matrix(hparams))
    lr = 1.0 / minibatch_lambda_max(data, hparams)
    rows = []
    for steps in steps_list:
        load = os.getloadavg()[0]
        warmup = max(2, math.ceil(FISHER_UPDATES / steps))
        references, ref_thetas, results = None, None, []
        for name, spec in methods(params0, cfg).items():
            for q in spec[1]:
                state = spec[0](q, lr, data.train).init(theta, hparams)
                times, grads, thetas = run_method(
                    stepper, name, spec, q, steps, state, hparams, data, lr, warmup, cfg["measured"]
                )
                if references is None:  # every method has the same θ trajectory
                    references = [exact_hypergradient(problem, data, t, hparams) for t in thetas]
                    ref_thetas = thetas
                cosines = [cosine(g, r) for g, r in zip(grads, references)]
                drift = max(
                    float(np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b)))
                    for a, b in zip(thetas, ref_thetas)
                )
                results.append(
                    {
                        "method": name,
                        "q": None if is_nhgd(name) else int(q),
                        "time_s": statistics.median(times),
                        "time_min_s": min(times),
                        "timed_calls": len(times),
                        "cosines": cosines,
                        "cosine": float(np.mean(cosines)),
                        "theta_rel_diff": drift,
                    }
                )
        row = {
            "width": width,
            "params": int(sum(x.size for x in jax.tree.leaves(params0))),
            "kappa": kappa,
            "inner_steps": steps,
            "warmup_steps": warmup,
            "hessian_condition": float(eigs[-1] / eigs[0]),
            "cg_iterations": iterations,
            "inner_lr": lr,
            "load_average": load,
            "results": results,
        }
        row["targets"] = {str(c): time_to_target(results, c) for c in TARGETS}
        rows.append(row)
        say(row)
    return rows


def time_to_target(results: list[dict], target: float) -> dict:
    """Best NHGD variant's and best baseline's least time per outer step reaching
    ``target`` (mean cosine), and NHGD / baseline (None where either never reaches it);
    ``ratio_min_times`` the same with each method's fastest call."""
    best, fastest = {}, {}
    for side in ("nhgd", "baseline"):
        hits = [
            r for r in results if is_nhgd(r["method"]) == (side == "nhgd") and r["cosine"] >= target
        ]
        best[side] = min(hits, key=lambda r: r["time_s"]) if hits else None
        fastest[side] = min((r["time_min_s"] for r in hits), default=None)
    n, b = best["nhgd"], best["baseline"]
    label = lambda r: r["method"] + ("" if r["q"] is None else f" Q={r['q']}")  # noqa: E731
    if n and b:
        verdict = "nhgd faster" if n["time_s"] < b["time_s"] else "baseline faster"
    else:
        verdict = "only nhgd" if n else "only baselines" if b else "neither"
    return {
        "nhgd_s": n["time_s"] if n else None,
        "nhgd_method": label(n) if n else None,
        "baseline_s": b["time_s"] if b else None,
        "baseline_method": label(b) if b else None,
        "ratio": n["time_s"] / b["time_s"] if n and b else None,
        "ratio_min_times": fastest["nhgd"] / fastest["baseline"] if n and b else None,
        "verdict": verdict,
    }


def say(row) -> None:
    lines = [
        f"w={row['width']} |θ|={row['params']} κ={row['kappa']:g} T={row['inner_steps']} "
        f"cond={row['hessian_condition']:.3g} CG iters={row['cg_iterations']} "
        f"load={row['load_average']:.1f}"
    ]
    for r in row["results"]:
        q = "" if r["q"] is None else f" Q={r['q']}"
        lines.append(
            f"  {r['method']}{q}: {r['time_s'] * 1e3:.1f} ms (min {r['time_min_s'] * 1e3:.1f}), "
            f"cos {r['cosine']:.4f}"
        )
    for c, t in row["targets"].items():
        ratio = "" if t["ratio"] is None else f", ratio {t['ratio']:.2f}"
        lines.append(f"  cos ≥ {c}: {t['verdict']}{ratio}")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- report


def _ratio_text(t) -> str:
    if t["ratio"] is not None:
        return f"{t['ratio']:.2f}"
    return {"only nhgd": "NHGD only", "only baselines": "baselines only"}.get(
        t["verdict"], "neither"
    )


def markdown(info, cfg, rows, elapsed, quick, compile_s) -> str:
    m = info
    lines = [
        "# NHGD scaling: its regime map against CG, Neumann and stocBiO",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']}), Python "
        f"{m['python']}; {m['date']}; 1-minute load average at start "
        f"{m['load_average_at_start']:.2f} (per cell below: the machine is shared, so each "
        "method's fastest call is recorded too). Command: "
        f"`python benchmarks/nhgd_scaling.py{' --quick' if quick else ''}` ({elapsed:.0f} s, "
        f"of which {compile_s:.0f} s compiling).",
        "",
        "Family: multi-output linear regression (one flax Dense layer), width w: w features, "
        f"w outputs, |θ| = w(w+1); feature covariance condition number κ; ridge ρ = {RIDGE:g}; "
        f"minibatches of {BATCH}; {cfg['n_train']} training and {cfg['n_val']} validation "
        f"samples; NHGD's EMA β = {BETA}. Warm-up outer steps (≥ {FISHER_UPDATES} Fisher "
        f"updates) + {cfg['measured']} measured; time per outer step = median over the calls "
        "(compiled; compilation excluded); cosine = mean over the measured steps against the "
        "exact hypergradient at the same (θ, λ). CG iters: plain CG on the full-data Hessian "
        "to relative residual 1e-3. Methods: the script's docstring. For one dense layer with "
        "Gaussian noise the K-FAC factorisation is exact in expectation (the Fisher is "
        "E[āāᵀ] ⊗ σ²I): this family is K-FAC's best case, its only error the sampling of the "
        "factors; for deeper or softmax models the factorisation adds its own bias.",
        "",
        "## Time to a target cosine: NHGD (best variant) / best baseline",
        "",
        "< 1: NHGD reaches the cosine in less time per outer step than any baseline. `NHGD "
        "only` / `baselines only`: the other side never reaches it on its grid.",
        "",
        "| w | params | κ | cond(H) | CG iters | T | NHGD K-FAC cos | "
        + " | ".join(f"cos ≥ {c}: NHGD / baseline (NHGD; baseline)" for c in TARGETS)
        + " | load |",
        "|---|---|---|---|---|---|---|" + "---|" * len(TARGETS) + "---|",
    ]
    for row in rows:
        kfac = next(r for r in row["results"] if r["method"] == "nhgd_kfac")
        cells = []
        for c in TARGETS:
            t = row["targets"][str(c)]
            cells.append(
                f"{_ratio_text(t)} ({t['nhgd_method'] or '-'}; {t['baseline_method'] or '-'})"
            )
        lines.append(
            f"| {row['width']} | {row['params']} | {row['kappa']:g} | "
            f"{row['hessian_condition']:.3g} | {row['cg_iterations']} | {row['inner_steps']} | "
            f"{kfac['cosine']:.4f} | " + " | ".join(cells) + f" | {row['load_average']:.1f} |"
        )
    lines += [
        "",
        '## NHGD\'s per-sample path: vmap (before) vs factored (`per_sample_grads="flax_dense"`)',
        "",
        "Time per outer step (ms), κ = 1 (the cost does not depend on κ). `online`: the same "
        "online K-FAC inverses as before, fed the factors; `solve`: `KFACFisher(inverse="
        '"solve")`.',
        "",
        "| w | params | T | vmap, online | factored, online | factored, solve | vmap / solve |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["kappa"] != min(r["kappa"] for r in rows):
            continue
        t = {r["method"]: r["time_s"] * 1e3 for r in row["results"] if is_nhgd(r["method"])}
        lines.append(
            f"| {row['width']} | {row['params']} | {row['inner_steps']} | "
            f"{t['nhgd_kfac_vmap']:.2f} | {t['nhgd_kfac_online']:.2f} | {t['nhgd_kfac']:.2f} | "
            f"{t['nhgd_kfac_vmap'] / t['nhgd_kfac']:.1f}x |"
        )
    lines += [
        "",
        "## Every method: time per outer step and cosine to the exact hypergradient",
        "",
        "| w | κ | T | method | Q | time (ms) | fastest (ms) | cosine | θ rel. diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row["results"]:
            lines.append(
                f"| {row['width']} | {row['kappa']:g} | {row['inner_steps']} | {r['method']} | "
                f"{'' if r['q'] is None else r['q']} | {r['time_s'] * 1e3:.2f} | "
                f"{r['time_min_s'] * 1e3:.2f} | {r['cosine']:.4f} | {r['theta_rel_diff']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows, steps, path: Path) -> None:
    """The regime map at ``T = steps``: columns = parameter count, rows = κ (each cell also
    gives the CG iterations an accurate full-data solve needs), colour = log2 of NHGD's time
    to the target cosine over the best baseline's; one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    main = [r for r in rows if r["inner_steps"] == steps]
    sizes = sorted({r["params"] for r in main})
    kappas = sorted({r["kappa"] for r in main})
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-3.0, vmax=3.0)
    cmap = plt.get_cmap("coolwarm")
    fig, axes = plt.subplots(
        1, len(TARGETS), figsize=(4.6 * len(TARGETS) + 1.2, 4.4), squeeze=False,
        constrained_layout=True,
    )  # fmt: skip
    for ax, c in zip(axes[0], TARGETS):
        for r in main:
            t = r["targets"][str(c)]
            i, j = sizes.index(r["params"]), kappas.index(r["kappa"])
            if t["ratio"] is not None:
                colour, text = cmap(norm(np.clip(np.log2(t["ratio"]), -3, 3))), f"{t['ratio']:.2f}"
            else:
                colour, text = {
                    "only nhgd": (cmap(0.0), "NHGD\nonly"),
                    "only baselines": (cmap(1.0), "baselines\nonly"),
                }.get(t["verdict"], ("lightgrey", "neither"))
            ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, color=colour))
            ax.text(i, j + 0.12, text, ha="center", va="center", fontsize=9)
            ax.text(i, j - 0.25, f"CG {r['cg_iterations']}", ha="center", va="center", fontsize=7)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.set_ylim(-0.5, len(kappas) - 0.5)
        ax.set_xticks(range(len(sizes)), [f"{n:.1e}" for n in sizes])
        ax.set_yticks(range(len(kappas)), [f"{k:g}" for k in kappas])
        ax.set_xlabel("parameters |θ|")
        ax.set_ylabel("κ: feature covariance condition number")
        ax.set_title(f"time to cosine ≥ {c}: NHGD / best baseline (T = {steps})", fontsize=9)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=axes[0].tolist(), label="log2 ratio (< 0: NHGD faster)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small widths, one T")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})"
    )
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    start = time.perf_counter()
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']} ({info['backend']})")
    rows, steppers = [], []
    for width in cfg["widths"]:
        problem, params, hparams = make_problem(width)
        stepper = Stepper(problem)
        stepper.problem_info = (problem, params, hparams)
        steppers.append(stepper)
        for kappa in cfg["kappas"]:
            steps_list = [cfg["steps"]]
            if cfg["sweep"] and width == cfg["sweep"][0]:
                steps_list += list(cfg["sweep"][1])
            rows += cell(width, kappa, steps_list, cfg, stepper)
    elapsed = time.perf_counter() - start
    compile_s = sum(s.compile_s for s in steppers)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": info,
        "quick": args.quick,
        "elapsed_s": elapsed,
        "compile_s": compile_s,
        "config": {**cfg, "ridge": RIDGE, "beta": BETA, "batch": BATCH, "targets": TARGETS},
        "rows": rows,
    }
    (args.out / "nhgd_scaling.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "nhgd_scaling.md").write_text(
        markdown(info, cfg, rows, elapsed, args.quick, compile_s)
    )
    plot(rows, cfg["steps"], args.out / "nhgd_scaling.png")
    print(f"wrote {args.out}/nhgd_scaling.{{json,md,png}} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
