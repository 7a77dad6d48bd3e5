"""FDS reproductions: forward-mode hypergradients with hyperparameter sharing (Micaelli &
Storkey 2021)."""
