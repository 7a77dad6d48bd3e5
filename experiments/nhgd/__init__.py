"""NHGD against stochastic bilevel baselines (ALGORITHMS.md §3): hyper-cleaning,
regularization, distillation."""
