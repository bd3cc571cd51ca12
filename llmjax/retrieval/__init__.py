"""Vector search: exact and approximate nearest neighbours behind one interface (see base.py).

    from llmjax.retrieval import ExactIndex, load_index, recall_at_k
    from llmjax.retrieval.hnsw import HNSWIndex                  # CPU graph (numba)
    from llmjax.retrieval.ivfpq import IVFPQIndex                # IVF + anisotropic PQ (JAX, GPU or CPU)
    from llmjax.retrieval.filtered_vamana import FilteredVamanaIndex  # label-filtered graph (numba)
"""

from llmjax.retrieval.base import IndexStats, RetrievalError, VectorIndex, load_index, recall_at_k
from llmjax.retrieval.exact import ExactIndex, exact_search_reference

__all__ = ["ExactIndex", "IndexStats", "RetrievalError", "VectorIndex", "exact_search_reference", "load_index",
           "recall_at_k"]
