"""csctr: Category-Specific CNNs for visual-aware CTR prediction (JAX/Flax NNX)."""
