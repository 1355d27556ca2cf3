"""Certified exact minimum pairwise L2 distance (see api.py)."""
