"""The PyTorch side of the unrolled comparison: one hypergradient, four ways.

The setting is ``benchmarks/estimators.py``'s horizon benchmark: an MLP 64 -> 32 -> 10 (tanh),
cross-entropy on minibatches of the training set, ``T`` steps of SGD with momentum in the
PyTorch convention (what ``hg.optim.sgd_momentum`` computes)::

    v' = β v + g + ξ θ        θ' = θ − α_j(t) v'        j(t) = min(floor(N t / T), N − 1)

with 12 hyperparameters (``N = 10`` learning-rate blocks α, momentum β, weight decay ξ), then
the gradient of the validation cross-entropy at ``θ_T`` with respect to ``(α, β, ξ)``. The
minibatch rows of every step (``Setting.idx``) come from the JAX side, so both sides see the
same batches. Each function returns ``(hypergradient as 12 float64 values, outer loss)``:
``[α_0 .. α_9, β, ξ]``.

- ``hand_written``: a loop of ``torch.autograd.grad(..., create_graph=True)`` and the update
  above on a list of tensors, then one ``torch.autograd.grad`` of the outer loss.
- ``with_higher``: ``higher.innerloop_ctx`` around ``torch.optim.SGD``, the hyperparameters
  passed as tensors through ``override`` (the learning rate re-overridden at every step).
- ``with_torchopt``: ``torchopt.MetaSGD`` with the learning-rate schedule as a callable of
  its step count and a tensor momentum. TorchOpt cannot take a tensor weight decay (it
  calls ``g.add(p, alpha=weight_decay)``, and ``alpha`` must be a Python number), so ξ
  enters as ``ξ/2 ||θ||²`` added to the inner loss: the same gradient ``g + ξ θ``.
- ``with_torch_func``: ``torch.func.grad`` of the unrolled loop, with ``torch.func.grad`` of
  the inner loss inside it.

Requires ``torch``; ``higher`` and ``torchopt`` are imported by their functions only, so
``available()`` can report which are missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 — PyTorch's own convention
from torch import nn


class Setting(NamedTuple):
    """The data, initial parameters, batches and hyperparameter values of one run."""

    x_train: torch.Tensor  # [n, 64] float32
    y_train: torch.Tensor  # [n] int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    params0: tuple[torch.Tensor, ...]  # (W0 [32, 64], b0, W1 [10, 32], b1): nn.Linear layout
    idx: torch.Tensor  # [T, B] int64: the training rows of step t are idx[t]
    lr: np.ndarray  # [N] the learning-rate schedule's blocks
    momentum: float
    weight_decay: float


def setting(train, val, params0, idx, lr, momentum, weight_decay) -> Setting:
    """From the JAX side's arrays: ``train``/``val`` ``{"x", "y"}`` batches, ``params0`` the
    flax MLP's ``{"Dense_i": {"kernel", "bias"}}`` (kernels transposed into ``nn.Linear``'s
    ``[out, in]``), ``idx`` the ``[T, B]`` minibatch rows."""

    def tensor(a, dtype):
        return torch.from_numpy(np.array(a)).to(dtype)

    layers = [params0[f"Dense_{i}"] for i in range(2)]
    params = []
    for layer in layers:
        params += [tensor(np.asarray(layer["kernel"]).T, torch.float32)]
        params += [tensor(layer["bias"], torch.float32)]
    return Setting(
        tensor(train["x"], torch.float32),
        tensor(train["y"], torch.int64),
        tensor(val["x"], torch.float32),
        tensor(val["y"], torch.int64),
        tuple(params),
        tensor(idx, torch.int64),
        np.asarray(lr, np.float32),
        float(momentum),
        float(weight_decay),
    )


def available() -> dict[str, str]:
    """``{module: version or 'not importable: <reason>'}`` for torch, higher and torchopt
    (higher has no ``__version__``: the versions are the installed distributions')."""
    out = {}
    for name in ("torch", "higher", "torchopt"):
        try:
            importlib.import_module(name)
        except Exception as e:  # any import failure is reported, not raised
            out[name] = f"not importable: {type(e).__name__}: {e}"
        else:
            out[name] = importlib.metadata.version(name)
    return out


# ----------------------------------------------------------------------------- helpers


def _hparams(s: Setting):
    """Fresh leaf tensors ``(α [N], β, ξ)`` that require grad."""
    lr = torch.tensor(s.lr, dtype=torch.float32, requires_grad=True)
    mom = torch.tensor(s.momentum, dtype=torch.float32, requires_grad=True)
    wd = torch.tensor(s.weight_decay, dtype=torch.float32, requires_grad=True)
    return lr, mom, wd


def _block(t: int, T: int, N: int) -> int:
    """The schedule block of step ``t`` (``hg.optim.shared_index``)."""
    return min(N * t // T, N - 1)


def _forward(params, x):
    w0, b0, w1, b1 = params
    return F.linear(torch.tanh(F.linear(x, w0, b0)), w1, b1)


def _module(s: Setting) -> nn.Module:
    """``nn.Sequential(Linear(64, 32), Tanh(), Linear(32, 10))`` holding ``params0``."""
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), s.params0, strict=True):
            p.copy_(p0)
    return model


def _batch(s: Setting, t: int):
    rows = s.idx[t]
    return s.x_train[rows], s.y_train[rows]


def _result(grads, outer) -> tuple[np.ndarray, float]:
    lr, mom, wd = (g.detach().double().reshape(-1).numpy() for g in grads)
    return np.concatenate([lr, mom, wd]), float(outer.detach())


# ----------------------------------------------------------------------------- the four ways


def hand_written(s: Setting) -> tuple[np.ndarray, float]:
    """The unrolled loop with ``torch.autograd.grad(..., create_graph=True)``."""
    lr, mom, wd = hp = _hparams(s)
    params = [p.clone().requires_grad_() for p in s.params0]
    vel = [torch.zeros_like(p) for p in params]
    T, N = s.idx.shape[0], lr.shape[0]
    for t in range(T):
        x, y = _batch(s, t)
        loss = F.cross_entropy(_forward(params, x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        a = lr[_block(t, T, N)]
        vel = [mom * v + g + wd * p for v, g, p in zip(vel, grads, params, strict=True)]
        params = [p - a * v for p, v in zip(params, vel, strict=True)]
    outer = F.cross_entropy(_forward(params, s.x_val), s.y_val)
    return _result(torch.autograd.grad(outer, hp), outer)


def with_higher(s: Setting) -> tuple[np.ndarray, float]:
    """``higher.innerloop_ctx`` over ``torch.optim.SGD``, tensor hyperparameters by override."""
    import higher

    lr, mom, wd = hp = _hparams(s)
    model = _module(s)
    opt = torch.optim.SGD(
        model.parameters(), lr=float(s.lr[0]), momentum=s.momentum, weight_decay=s.weight_decay
    )
    T, N = s.idx.shape[0], lr.shape[0]
    override = {"lr": [lr[0]], "momentum": [mom], "weight_decay": [wd]}
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True, override=override) as (
        fmodel,
        diffopt,
    ):
        for t in range(T):
            x, y = _batch(s, t)
            loss = F.cross_entropy(fmodel(x), y)
            diffopt.step(loss, override={"lr": [lr[_block(t, T, N)]]})
        outer = F.cross_entropy(fmodel(s.x_val), s.y_val)
        return _result(torch.autograd.grad(outer, hp), outer)


def with_torchopt(s: Setting) -> tuple[np.ndarray, float]:
    """``torchopt.MetaSGD``: lr schedule as a callable of the step count, tensor momentum;
    weight decay as an L2 term in the loss (TorchOpt takes only a float weight decay)."""
    import torchopt

    lr, mom, wd = hp = _hparams(s)
    model = _module(s)
    T, N = s.idx.shape[0], lr.shape[0]

    def schedule(count):  # count: TorchOpt's int64 step counter
        return lr[torch.clamp(N * count // T, max=N - 1)]

    opt = torchopt.MetaSGD(model, lr=schedule, momentum=mom, weight_decay=0.0)
    for t in range(T):
        x, y = _batch(s, t)
        penalty = sum(p.pow(2).sum() for p in model.parameters())
        loss = F.cross_entropy(model(x), y) + 0.5 * wd * penalty
        opt.step(loss)
    outer = F.cross_entropy(model(s.x_val), s.y_val)
    return _result(torch.autograd.grad(outer, hp), outer)


def with_torch_func(s: Setting) -> tuple[np.ndarray, float]:
    """``torch.func.grad`` of the unrolled loop (``torch.func.grad`` of the inner loss inside)."""
    from torch.func import grad, grad_and_value

    T, N = s.idx.shape[0], len(s.lr)

    def inner_loss(params, x, y):
        return F.cross_entropy(_forward(params, x), y)

    def outer_loss(hp):
        lr, mom, wd = hp
        params = s.params0
        vel = tuple(torch.zeros_like(p) for p in params)
        for t in range(T):
            grads = grad(inner_loss)(params, *_batch(s, t))
            a = lr[_block(t, T, N)]
            vel = tuple(mom * v + g + wd * p for v, g, p in zip(vel, grads, params, strict=True))
            params = tuple(p - a * v for p, v in zip(params, vel, strict=True))
        return F.cross_entropy(_forward(params, s.x_val), s.y_val)

    hp = tuple(h.detach() for h in _hparams(s))
    grads, outer = grad_and_value(outer_loss)(hp)
    return _result(grads, outer)


METHODS = {  # column name -> (function, the module it needs beyond torch)
    "hand-written torch": (hand_written, None),
    "higher": (with_higher, "higher"),
    "TorchOpt": (with_torchopt, "torchopt"),
    "torch.func": (with_torch_func, None),
}
