"""ResAlign (Li et al., NeurIPS 2025): resilient unlearning of a small diffusion model."""
