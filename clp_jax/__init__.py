"""clp-jax: CLP-Transfer and multilingual post-training in JAX/Flax."""

__version__ = "0.1.0"
