"""Experiments on what states encode about future tokens: linear probes (``probe``), the synthetic
pre-caching task, vanilla vs myopic training (``precache``), and myopic training on language
(``myopic_lm``)."""

import contextlib


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to ``n`` for the block (0 = leave torch's default), restored after it."""
    import torch

    saved = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
