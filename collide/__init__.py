"""collide: certified exact collision search over language-model hidden states.

Stages, one module each, each usable alone from Python:
corpus (prompts) -> models (load, capture states) -> extract (batched forward into a store)
-> store (sharded Parquet) -> search (certified exact min distance) -> report.
"""

__version__ = "0.1.0"
