"""Inversion: recover the exact prompt from its hidden states at every position of one layer (SIPIT, batched).

``python -m collide.invert SOURCE [layer=K] [model=NAME]`` (``collide.invert.__main__``); the
algorithm is ``collide.invert.sipit``, SOURCE readers ``collide.invert.sources``, outputs
``collide.invert.output``, the paper's own procedure for comparison ``collide.invert.paper``.
"""
