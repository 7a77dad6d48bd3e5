"""NHGD against stochastic bilevel baselines (Kong, Chen, Zhang, Mou 2026): hyper-cleaning,
regularization, distillation."""
