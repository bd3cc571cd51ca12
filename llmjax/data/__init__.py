"""Corpora -> token shards -> batches."""
