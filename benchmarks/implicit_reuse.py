"""Linear-solve time of implicit hypergradients over an outer loop: reuse vs jaxopt.

Over ``STEPS`` outer steps of hyperparameter learning (Adam on the log-penalties), each step's
hypergradient needs one solve ``(H + ridge I) v = ∇_θ f`` at that step's ``(θ_k, λ_k)``. The
trajectory is run once (``hg.outer.step`` with ``Implicit``); then, step by step on that same
trajectory, every solver solves the same systems and only the solves are timed:

* ``jaxopt``: ``jaxopt.linear_solve.solve_cg``, what ``custom_root(..., solve=solve_cg)``
  calls in its backward pass: CG from zero at every step (its only option);
* ``ours cold``: ``hg.CG``, from zero (the same algorithm: the matvec count should match);
* ``ours warm``: ``hg.CG`` from the previous step's solution (what ``hg.outer.step`` passes);
* ``ours warm + Hutchinson``: ``hg.CG(precond=hg.linalg.Hutchinson(...))`` from the previous
  step's :class:`~hypergrad_jax.linalg.Warm`: the solution and a diagonal preconditioner
  whose estimate sharpens across steps (its probes are counted and timed).

All solve in float32 with the same ``tol`` (relative residual), ``maxiter`` and ``ridge``.
Only the solve is timed (the right-hand side and the hypergradient from ``v`` are computed
outside the timed call, the same for every solver). Accuracy: at every 5th step the
hypergradient of each solver is compared with a
float64 dense reference (the Hessian materialised in float64, a direct solve) at the same
``(θ_k, λ_k)``: the same accuracy is part of the claim.

Problems: the estimators benchmark's MLP (64 -> 32 -> 10 on digits, full batch, a per-layer L2
penalty: 2 hyperparameters, 2,410 parameters), and a logistic regression with 2,000
features of spread scales and 2,000 per-feature penalties (500 train / 500 validation).

Run:  python benchmarks/implicit_reuse.py [--quick] [--out DIR]
Writes DIR/implicit_reuse.{json,md} (default benchmarks/results).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package, when run as a script

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # the float64 reference; everything timed is float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import hypergrad_jax as hg  # noqa: E402
from benchmarks import estimators  # noqa: E402
from benchmarks.estimators import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TOL, MAXITER, RIDGE = 1e-5, 500, 1e-4
PROBES = 4


# ----------------------------------------------------------------------------- problems


def mlp_problem(inner_steps: int):
    train, val = estimators.load_data()
    params0 = estimators.CLASSIFIER.init(jax.random.key(0), 64, dtype=jnp.float32)
    log_l2 = jnp.log(jnp.float32(estimators.L2))
    hparams = {"log_l2": dict.fromkeys(estimators.LAYERS, log_l2)}
    run = hg.InnerRun(
        hg.optim.sgd_momentum(),
        inner_steps,
        optimizer_hparams=lambda h: {"lr": 1.0, "momentum": 0.9},
    )
    return (
        "MLP, per-layer L2 (2 hparams, 2,410 params)",
        estimators.L2_PROBLEM,
        run,
        hparams,
        params0,
        train,
        val,
    )


def logistic_problem(inner_steps: int, features: int = 2000, n: int = 500):
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(-1.5, 1.5, features))  # spread feature scales
    w = rng.normal(size=features) * (rng.uniform(size=features) < 0.05)

    def split(m):
        x = rng.normal(size=(m, features)) * scales
        y = (rng.uniform(size=m) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
        return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}

    train, val = split(n), split(n)

    def loss(params, batch):
        logits = batch["x"] @ params["w"] + params["b"]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["y"]))

    def inner(params, hparams, batch):
        return loss(params, batch) + 0.5 * jnp.sum(jnp.exp(hparams["log_l2"]) * params["w"] ** 2)

    problem = hg.BilevelProblem(inner, lambda p, h, b: loss(p, b))
    params0 = {"w": jnp.zeros(features, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    hparams = {"log_l2": jnp.full(features, jnp.log(1e-2), jnp.float32)}
    lr = 1.0 / float(np.mean(np.sum(np.asarray(train["x"]) ** 2, 1)) / 4 + 1)
    run = hg.InnerRun(
        hg.optim.sgd_momentum(),
        inner_steps,
        optimizer_hparams=lambda h: {"lr": lr, "momentum": 0.9},
    )
    name = f"logistic regression, {features:,} per-feature penalties ({n} train / {n} val)"
    return name, problem, run, hparams, params0, train, val


# ----------------------------------------------------------------------------- measuring


def trajectory(problem, run, hparams, params0, train, val, steps, lr):
    """``(λ_k, θ_k)`` of ``steps`` outer steps (Adam on λ, warm-started inner runs)."""
    est = hg.Implicit(hg.CG(maxiter=MAXITER, tol=TOL, ridge=RIDGE))
    opt = optax.adam(lr)
    state = hg.outer.init(opt, hparams, params0, jax.random.key(0), method=est)
    step = jax.jit(lambda s: hg.outer.step(problem, run, est, opt, s, train, val))
    out = []
    for _ in range(steps):
        h = state.hparams
        state, metrics = step(state)
        out.append((h, state.params, float(metrics.outer_loss)))
    return out


def system(problem, train, val):
    """``matvec(θ, λ)``, ``rhs(θ, λ) = ∇_θ f`` and ``hypergradient(θ, λ, v)``, float32."""

    def matvec(theta, h):
        return lambda v: hg.linalg.hvp(problem.inner_loss, theta, v, h, train)

    def rhs(theta, h):
        return jax.grad(problem.outer_loss)(theta, h, val)

    def hypergradient(theta, h, v):
        f_h = jax.grad(problem.outer_loss, argnums=1)(theta, h, val)
        _, mixed = jax.vjp(lambda hh: jax.grad(problem.inner_loss)(theta, hh, train), h)
        return optax.tree.sub(f_h, mixed(v)[0])

    return matvec, jax.jit(rhs), jax.jit(hypergradient)


def dense_reference(problem, train, val, theta, h):
    """The float64 hypergradient: the Hessian materialised, a direct solve."""
    to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
    theta, h = to64(theta), to64(h)
    tr = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, train)
    va = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, val)
    flat, unravel = ravel_pytree(theta)
    grad_flat = lambda f: ravel_pytree(jax.grad(problem.inner_loss)(unravel(f), h, tr))[0]  # noqa: E731
    hess = jax.jit(jax.jacfwd(grad_flat))(flat) + RIDGE * jnp.eye(flat.size)
    f_theta, f_h = jax.grad(problem.outer_loss, argnums=(0, 1))(theta, h, va)
    b = ravel_pytree(f_theta)[0]
    v = unravel(jnp.linalg.solve(hess, b))
    _, mixed = jax.vjp(lambda hh: jax.grad(problem.inner_loss)(theta, hh, tr), h)
    return optax.tree.sub(f_h, mixed(v)[0]), np.asarray(hess), np.asarray(b)


def cg_iterations(hess, b, inverse=None, maxiter=5000) -> int:
    """Iterations of (preconditioned) CG to ``TOL`` on a dense float64 system; ``inverse``:
    ``r -> M⁻¹ r``."""
    scale = (lambda r: r) if inverse is None else inverse  # noqa: E731
    x, r = np.zeros_like(b), b.copy()
    z = scale(r)
    p, rz, k = z.copy(), r @ z, 0
    while np.linalg.norm(r) > TOL * np.linalg.norm(b) and k < maxiter:
        ap = hess @ p
        alpha = rz / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        z = scale(r)
        rz, rz_old = r @ z, rz
        p = z + (rz / rz_old) * p
        k += 1
    return k


def layer_blocks(theta) -> list[np.ndarray]:
    """Indices into the flat parameters of each top-level entry of ``theta`` (a layer)."""
    idx = ravel_pytree(jax.tree.map(lambda x: jnp.zeros(jnp.shape(x)), theta))[1]
    flat = idx(jnp.arange(sum(x.size for x in jax.tree.leaves(theta))))
    return [
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)]).astype(np.int64)
        for v in flat.values()
    ]


def mlp_kfac(theta, h, train) -> np.ndarray:
    """K-FAC of the MLP's Gauss-Newton matrix (per layer ``A ⊗ S``: input second moments,
    softmax-curvature of the pre-activations), plus each layer's exact L2 term and the
    ridge, as a dense float64 matrix in the flat parameter order."""
    t = jax.tree.map(lambda x: np.asarray(x, np.float64), theta)
    x = np.asarray(train["x"], np.float64)
    w0, b0, w1, b1 = (t[k][n] for k in estimators.LAYERS for n in ("kernel", "bias"))
    hid = np.tanh(x @ w0 + b0)
    logits = hid @ w1 + b1
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    lam = prob[:, :, None] * np.eye(10) - prob[:, :, None] * prob[:, None, :]
    jac = (1 - hid**2)[:, :, None] * w1  # d logits / d hidden pre-activations
    factors = {  # layer: (A over inputs with a bias 1, S over outputs)
        estimators.LAYERS[0]: (
            np.c_[x, np.ones(len(x))],
            np.einsum("ijk,ikl,iml->jm", jac, lam, jac),
        ),
        estimators.LAYERS[1]: (np.c_[hid, np.ones(len(x))], lam.sum(0)),
    }
    size = sum(v.size for v in jax.tree.leaves(theta))
    flat = ravel_pytree(theta)[1](jnp.arange(size))
    m = np.zeros((size, size))
    for layer, (a, s_sum) in factors.items():
        order = np.concatenate([np.ravel(flat[layer][n]) for n in ("kernel", "bias")])
        order = order.astype(np.int64)
        l2 = float(np.exp(h["log_l2"][layer]))
        block = np.kron(a.T @ a / len(a), s_sum / len(a)) + (l2 + RIDGE) * np.eye(order.size)
        m[np.ix_(order, order)] = block
    return m


def preconditioning_bounds(hess, b, blocks, kfac=None) -> dict:
    """What the best preconditioners of their kind could do on this system (float64, dense):
    the exact diagonal (Jacobi, the limit of Hutchinson's estimate) and the exact
    eigenvectors of the k smallest eigenvalues mapped onto the (k+1)-th (the limit of
    recycling the previous solve's Ritz vectors), against plain CG."""
    eig, vecs = np.linalg.eigh(hess)
    out = {"eig_min": float(eig[0]), "eig_max": float(eig[-1]), "plain": cg_iterations(hess, b)}
    out["exact_jacobi"] = cg_iterations(hess, b, lambda r: r / np.diag(hess))
    for k in (10, 20, 50):
        u, shift = vecs[:, :k], eig[k] / eig[:k] - 1
        deflate = lambda r, u=u, c=shift: r + u @ (c * (u.T @ r))  # noqa: E731
        out[f"deflate_{k}"] = cg_iterations(hess, b, deflate)
    exact_blocks = np.zeros_like(hess)
    for order in blocks:
        exact_blocks[np.ix_(order, order)] = hess[np.ix_(order, order)]
    inverse = np.linalg.inv(exact_blocks)
    out["layer_blocks"] = cg_iterations(hess, b, lambda r: inverse @ r)
    if kfac is not None:
        inverse_kfac = np.linalg.inv(kfac)
        out["kfac"] = cg_iterations(hess, b, lambda r: inverse_kfac @ r)
    return out


def rel_err(g, ref) -> float:
    a, b = ravel_pytree(g)[0].astype(jnp.float64), ravel_pytree(ref)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


SOLVERS = ("jaxopt", "ours cold", "ours warm", "ours warm + Hutchinson")


def bench_problem(make, inner_steps, steps, outer_lr, repeats, ref_every, with_kfac):
    from jaxopt.linear_solve import solve_cg

    name, problem, run, hparams, params0, train, val = make(inner_steps)
    print(f"{name}: {steps} outer steps ...", flush=True)
    traj = trajectory(problem, run, hparams, params0, train, val, steps, outer_lr)
    matvec, rhs, hypergradient = system(problem, train, val)
    cg = hg.CG(maxiter=MAXITER, tol=TOL, ridge=RIDGE)
    pcg = cg._replace(precond=hg.linalg.Hutchinson(probes=PROBES))

    # the timed calls: the solve alone (the right-hand side and the hypergradient from v are
    # computed outside them, the same for every solver)
    def ours(solver):
        return jax.jit(lambda theta, h, b, x0: solver(matvec(theta, h), b, x0))

    @jax.jit
    def theirs(theta, h, b):
        return solve_cg(matvec(theta, h), b, ridge=RIDGE, tol=TOL, maxiter=MAXITER)

    fns = {"jaxopt": theirs, "ours cold": ours(cg), "ours warm": ours(cg)}
    fns["ours warm + Hutchinson"] = ours(pcg)
    h0, theta0, _ = traj[0]
    warm = {
        "ours warm": jax.tree.map(jnp.zeros_like, theta0),
        "ours warm + Hutchinson": hg.linalg.initial_warm(pcg, theta0),
    }
    # compile (excluded from the times)
    compile_s = {}
    b0 = rhs(theta0, h0)
    for k, fn in fns.items():
        t0 = time.perf_counter()
        args = (theta0, h0, b0) if k == "jaxopt" else (theta0, h0, b0, warm.get(k))
        jax.block_until_ready(fn(*args))
        compile_s[k] = time.perf_counter() - t0
    totals = {k: 0.0 for k in fns}
    matvecs = {k: [] for k in fns if k != "jaxopt"}
    errors = {k: [] for k in fns}
    for i, (h, theta, _) in enumerate(traj):
        times, outs, b = {k: [] for k in fns}, {}, jax.block_until_ready(rhs(theta, h))
        for _ in range(repeats):  # interleaved: the machine's load falls on every solver
            for k, fn in fns.items():
                args = (theta, h, b) if k == "jaxopt" else (theta, h, b, warm.get(k))
                t0 = time.perf_counter()
                outs[k] = jax.block_until_ready(fn(*args))
                times[k].append(time.perf_counter() - t0)
        for k in fns:
            totals[k] += statistics.median(times[k])
        for k in matvecs:
            v, info = outs[k]
            matvecs[k].append(int(info.iterations) + 1)  # + the final residual check
            if k in warm:  # what the outer loop passes to the next step
                warm[k] = v if info.warm is None else info.warm
        if i % ref_every == 0 or i == len(traj) - 1:
            ref, hess, b64 = dense_reference(problem, train, val, theta, h)
            if i == len(traj) - 1:
                kfac = mlp_kfac(theta, h, train) if with_kfac else None
                bounds = preconditioning_bounds(hess, b64, layer_blocks(theta), kfac)
            for k in fns:
                v = outs[k] if k == "jaxopt" else outs[k][0]
                errors[k].append(rel_err(hypergradient(theta, h, v), ref))
    row = {
        "problem": name,
        "outer_steps": steps,
        "inner_steps": inner_steps,
        "outer_loss_first_last": [traj[0][2], traj[-1][2]],
        "total_solve_s": totals,
        "ratio_vs_jaxopt": {k: totals[k] / totals["jaxopt"] for k in fns},
        "compile_s": compile_s,
        "matvecs_per_step": {k: statistics.mean(v) for k, v in matvecs.items()},
        "matvecs_first_last": {k: [v[0], v[-1]] for k, v in matvecs.items()},
        "rel_err_vs_float64": {
            k: {"median": statistics.median(v), "max": max(v)} for k, v in errors.items()
        },
        "reference_steps": len(errors["jaxopt"]),
        "bounds_last_step": bounds,
    }
    for k in fns:
        print(
            f"  {k:<24} total {totals[k]:.3f} s  x{row['ratio_vs_jaxopt'][k]:.2f} jaxopt  "
            f"matvecs/step {row['matvecs_per_step'].get(k, float('nan')):6.1f}  "
            f"rel err median {row['rel_err_vs_float64'][k]['median']:.1e}",
            flush=True,
        )
    return row


def markdown(info: dict, rows: list[dict], elapsed: float, quick: bool) -> str:
    lines = [
        "# Implicit hypergradients over an outer loop: solve less by reusing the last step",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} ({info['backend']}), "
        f"Python {info['python']}; {info['date']}; 1-minute load average at start "
        f"{info['load_average_at_start']:.2f}, at end {info['load_average_at_end']:.2f}. "
        f"Command: `python benchmarks/implicit_reuse.py{' --quick' if quick else ''}` "
        f"({elapsed:.0f} s in all).",
        "",
        __doc__.split("\n\n", 1)[1].split("Run:")[0].strip(),
        "",
        f"Settings: tol {TOL} (relative residual), maxiter {MAXITER}, ridge {RIDGE}, "
        f"Hutchinson probes {PROBES} per solve, memory 0.9. Times: the sum over the outer steps "
        "of each solve's median time (interleaved repeats), compilation excluded (reported "
        "apart). Matvecs: CG iterations + probes + the final residual check (ours); "
        "jaxopt's count is not reported by `solve_cg` (its cold CG runs the same iterations "
        "as `ours cold`).",
        "",
    ]
    for r in rows:
        lines += [
            f"## {r['problem']}",
            "",
            f"{r['outer_steps']} outer steps (Adam on the log-penalties), inner run "
            f"{r['inner_steps']} warm-started steps; outer loss {r['outer_loss_first_last'][0]:.4f}"
            f" -> {r['outer_loss_first_last'][1]:.4f}. Accuracy at {r['reference_steps']} steps "
            "against the float64 dense reference.",
            "",
            "| solver | total solve time (s) | x jaxopt | matvecs / step (first -> last) | "
            "rel err vs float64 (median / max) | compile (s) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k in SOLVERS:
            mv = r["matvecs_per_step"].get(k)
            fl = r["matvecs_first_last"].get(k)
            mv_s = "" if mv is None else f"{mv:.1f} ({fl[0]} -> {fl[1]})"
            err = r["rel_err_vs_float64"][k]
            lines.append(
                f"| {k} | {r['total_solve_s'][k]:.3f} | {r['ratio_vs_jaxopt'][k]:.2f} | {mv_s} | "
                f"{err['median']:.1e} / {err['max']:.1e} | {r['compile_s'][k]:.2f} |"
            )
        bd = r["bounds_last_step"]
        indefinite = ": indefinite, the run is not at a minimum" if bd["eig_min"] < 0 else ""
        lines += [
            "",
            f"The limits at the last step (float64 dense system, eigenvalues from "
            f"{bd['eig_min']:.2e} to {bd['eig_max']:.2e}{indefinite}; CG iterations to the same "
            f"tol): plain CG {bd['plain']}, the exact "
            f"diagonal (Jacobi, what Hutchinson's estimate tends to) {bd['exact_jacobi']}, the "
            f"exact eigenvectors of the 10 / 20 / 50 smallest eigenvalues deflated (what "
            f"recycling Ritz vectors tends to) {bd['deflate_10']} / {bd['deflate_20']} / "
            f"{bd['deflate_50']}, the exact Hessian's per-layer blocks (|θ| matvecs to build) "
            f"{bd['layer_blocks']}"
            + (
                f", K-FAC of the Gauss-Newton matrix with the exact L2 terms {bd['kfac']}"
                if "kfac" in bd
                else ""
            )
            + ".",
            "",
        ]
    return "\n".join(lines) + "\n"


# name: (problem, inner steps per outer step, Adam's learning rate on the log-penalties)
PROBLEMS = {"mlp": (mlp_problem, 500, 0.05), "logistic": (logistic_problem, 300, 0.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 outer steps, 1 repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=sorted(PROBLEMS), help="one problem only")
    args = parser.parse_args()
    start = time.perf_counter()
    info = machine()
    steps, repeats, ref_every = (5, 1, 2) if args.quick else (50, 3, 5)
    rows = [
        bench_problem(make, inner, steps, lr, repeats, ref_every, with_kfac=name == "mlp")
        for name, (make, inner, lr) in PROBLEMS.items()
        if args.only in (None, name)
    ]
    info["load_average_at_end"] = os.getloadavg()[0]
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": info, "quick": args.quick, "elapsed_s": elapsed, "problems": rows}
    (args.out / "implicit_reuse.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "implicit_reuse.md").write_text(markdown(info, rows, elapsed, args.quick))
    print(f"wrote {args.out}/implicit_reuse.{{json,md}} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
