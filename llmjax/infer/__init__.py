"""Inference: generation (and, later, KV caches, batching engines and the server)."""
