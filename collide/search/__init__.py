"""Certified exact minimum pairwise L2 distance (see api.py; the engines: symmetric.py, faiss_engine.py;
the error bound: bounds.py). Imports only numpy and torch."""

from collide.search.api import LayerResult, PairwiseResult, min_pairwise, pick_backend, search_store

__all__ = ["LayerResult", "PairwiseResult", "min_pairwise", "pick_backend", "search_store"]
