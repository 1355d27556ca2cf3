"""Reading a lens bundle: a plain safetensors load against collide's checked load, and the first table read.

    python benchmarks/lens_load.py BUNDLE_DIR [BUNDLE_DIR ...]
    python benchmarks/lens_load.py --gemma-shape DIR   # writes a bundle of Gemma-3 270M's shape first

For each bundle (a ``collide.invert.lens`` directory: ``lens.safetensors`` + ``lens.json``), in one process,
each step timed on its own (wall seconds), the file already in the page cache (read once before):

- ``plain_s``: ``safetensors.torch.load_file`` alone (it memory-maps the file: nothing is read yet; no check);
- ``sha256_s``: hashing ``lens.safetensors`` in full, what a check without the digest memo would cost;
- ``load_s``: ``collide.invert.lens.load`` (size and digest through the memo, ``load_file``, NaN/Inf check);
- ``table_first_use_s`` / ``table_plain_use_s``: ``rankers.table_distances`` over the whole position-0
  table, the first time, on the checked and on the plain load's tensors (what position 0 of a prompt costs).

``--gemma-shape DIR`` writes a bundle with Gemma-3 270M's shapes (table 262,144 x 640 fp32, ridges 640 x 640;
seeded random values, identity marked synthetic) with ``collide.invert.lens.save``, then times it. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def timed(fn):
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def gemma_shaped(path: Path) -> Path:
    """A bundle of Gemma-3 270M's shapes at ``path`` (seeded random values)."""
    import torch

    from collide.invert.lens import Lens, Ridge, save

    g = torch.Generator().manual_seed(0)
    d, vocab = 640, 262_144

    def ridge():
        return Ridge(torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5, torch.randn(d, d, generator=g),
                     torch.randn(d, generator=g))

    identity = {"format": "synthetic", "model": {"name": "gemma3-270m-shaped"}, "layer": 9, "final_norm": "post",
                "prefix": [2]}
    save(Lens(identity, {"synthetic": True}, ridge(), ridge(), torch.arange(vocab), torch.randn(vocab, d, generator=g)),
         path)
    return path


def measure(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from collide.atomic import sha256_file
    from collide.invert import lens as lens_mod
    from collide.invert.rankers import table_distances

    weights = path / lens_mod.TENSORS
    identity = json.loads((path / lens_mod.META).read_text())["identity"]
    weights.read_bytes()  # into the page cache: every figure below reads memory, not the disk
    plain_s, plain = timed(lambda: load_file(str(weights)))
    sha256_s, _ = timed(lambda: sha256_file(weights))
    lens_mod.load(path, identity)  # the digest memo holds the file from here on, as after a save or a first load
    load_s, loaded = timed(lambda: lens_mod.load(path, identity))
    target = torch.randn(loaded.table.shape[1], generator=torch.Generator().manual_seed(1))
    first_s, _ = timed(lambda: table_distances(loaded, target))
    plain_lens = lens_mod.Lens(identity, {}, loaded.own, loaded.cont, plain["table_tokens"], plain["table"])
    plain_use_s, _ = timed(lambda: table_distances(plain_lens, target))
    return {"bundle": str(path), "bytes": weights.stat().st_size, "table_rows": int(loaded.table.shape[0]),
            "plain_s": plain_s, "sha256_s": sha256_s, "load_s": load_s, "table_first_use_s": first_s,
            "table_plain_use_s": plain_use_s}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--gemma-shape"]:
        args = [str(gemma_shaped(Path(args[1])))]
    print(json.dumps([measure(Path(a)) for a in args], indent=2))
