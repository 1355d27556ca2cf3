"""collide on a Ray cluster (``cluster=ray``; ``pip install 'collide[ray]'``).

``extract_to_store_ray`` and ``search_store_ray`` take the arguments of their local
counterparts (``collide.extract.extract_to_store``, ``collide.search.search_store``) plus the
``ClusterConfig``, and return the same objects: the store a local run makes (bitwise on CPU)
and the same certified LayerResult; ``invert_source_ray`` takes ``collide invert``'s config and writes
the inversion a local run writes. All run on one pool of warm workers (``collide.cluster.pool``).
Importing this package does not import ray; calling them does.
"""

from __future__ import annotations


def extract_to_store_ray(*args, **kwargs):
    """See ``collide.cluster.ray_extract.extract_to_store_ray``."""
    from collide.cluster.ray_extract import extract_to_store_ray as run

    return run(*args, **kwargs)


def search_store_ray(*args, **kwargs):
    """See ``collide.cluster.ray_search.search_store_ray``."""
    from collide.cluster.ray_search import search_store_ray as run

    return run(*args, **kwargs)


def invert_source_ray(*args, **kwargs):
    """See ``collide.cluster.ray_invert.invert_source_ray``."""
    from collide.cluster.ray_invert import invert_source_ray as run

    return run(*args, **kwargs)


__all__ = ["extract_to_store_ray", "invert_source_ray", "search_store_ray"]
