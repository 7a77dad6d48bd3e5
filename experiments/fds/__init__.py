"""FDS reproductions: forward-mode hypergradients with hyperparameter sharing (ALGORITHMS.md §2)."""
