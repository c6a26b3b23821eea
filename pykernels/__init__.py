"""pykernels: fused GPU kernels for sequence-model training (placeholder, being built)."""
