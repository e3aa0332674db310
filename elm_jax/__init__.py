"""elm_jax: Expert Language Models (Jang et al., 2023) in JAX/Flax."""

__version__ = "0.1.0"
