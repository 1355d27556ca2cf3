"""Experiments on stored states: linear probes of future tokens (``probe``) and the synthetic
pre-caching experiment, vanilla vs myopic training (``precache``)."""
