"""Peer comparison: ``hg.Unrolled()`` against PyTorch unrolls (higher, TorchOpt, torch.func,
a hand-written loop) and ``hg.Implicit(CG)`` against jaxopt. Entry point: ``run.py``; the
PyTorch side lives in ``unrolled_torch.py`` (it needs the optional ``peers`` extra)."""
