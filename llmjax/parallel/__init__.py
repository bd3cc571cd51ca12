"""Parallelism on jax.sharding meshes: mesh construction and the logical-axis rules table."""
