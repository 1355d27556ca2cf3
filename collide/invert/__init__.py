"""Inversion: recover the exact prompt from its hidden states at every position of one layer (SIPIT, batched).

``collide invert SOURCE [layer=K] [model=NAME]``: the whole SOURCE is ``driver.invert_source``; the
algorithm is ``sipit``, the candidate rankers of its policies ``rankers`` (the model's prior and the
lenses of ``lens``, fit and cached per model and layer), SOURCE readers ``sources``, outputs
``output``. The paper's own procedure,
the baseline it is timed against, is ``benchmarks/suite/paper_sipit.py``.
"""
