"""MLP-Mixer in JAX/Flax."""
