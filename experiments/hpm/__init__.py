"""HPM (Tao et al., NeurIPS 2020) against PBT, hypergradient descent and random search at
equal budget: a synthetic landscape and an MLP on digits."""
