"""Data curation: exact and MinHash-LSH deduplication, quality rules and a learned quality
classifier, PII masking, and the resumable pipeline behind `python -m experiments curate`.

    dedup       exact document / line / paragraph dedup (64-bit blake2b, first occurrence kept)
    minhash     shingles, vectorized MinHash signatures, LSH banding, union-find clusters
    quality     Gopher / C4-style heuristics with documented thresholds
    classifier  hashed n-gram logistic regression (JAX + optax), saved as .npz
    pii         e-mail / phone / IPv4 / IPv6 masking with counts
    pipeline    the stages, per-stage state files, the report
"""
