"""jaxunlearn: exact machine unlearning with vectorized ensembles in JAX/Flax."""

__version__ = "0.2.0"
