"""Hydra config tree of collide, shipped as package data (`pkg://collide.conf`)."""
