"""Certified exact minimum pairwise L2 distance (see api.py; the engines: symmetric.py, faiss_engine.py;
the error bound: bounds.py; the results: results.py). Imports only numpy and torch.

The names below are loaded on first use (PEP 562), so that ``collide.search.results`` (the
result types and their JSON form, numpy only) can be read without importing torch.
"""

__all__ = ["LayerResult", "PairwiseResult", "Pairs", "min_pairwise", "pick_backend", "search_store"]


def __getattr__(name: str):
    if name in ("LayerResult", "PairwiseResult", "Pairs"):
        from collide.search import results
        return getattr(results, name)
    if name in __all__:
        from collide.search import api
        return getattr(api, name)
    raise AttributeError(f"module 'collide.search' has no attribute {name!r}")
