"""spcl_jax: SPCL (semantic prototype-based contrastive learning) for domain
adaptive semantic segmentation, in JAX/Flax."""
