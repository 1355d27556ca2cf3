"""A store layer as a ``torch.utils.data.Dataset`` (``Store.torch_dataset``), over the memory-mapped
Arrow files of ``collide.store.ecosystem.hf_dataset``."""

from __future__ import annotations

import bisect

import numpy as np
import torch
import torch.utils.data

from collide.store.ecosystem import hf_dataset


class LayerDataset(torch.utils.data.Dataset):
    """Layer k of a store: item i is {"prompt_id": int, "state": float32 tensor (d,),
    "token_ids": int64 tensor (n_tokens,)}, items in prompt_id order.

    Each item copies its own row out of the memory-mapped files; nothing else is loaded. Works
    with ``torch.utils.data.DataLoader``, worker processes included.
    """

    def __init__(self, store, k: int):
        table = hf_dataset(store, k).with_format("arrow")[:]
        self._ids = table.column("prompt_id").to_numpy()
        self._tokens = table.column("token_ids")
        self._states = [chunk.flatten().to_numpy().reshape(-1, store.d) for chunk in table.column("state").chunks]
        self._starts = np.cumsum([0] + [len(x) for x in self._states]).tolist()  # first row of each chunk

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a {len(self)}-row layer dataset")
        i %= len(self)
        chunk = bisect.bisect_right(self._starts, i) - 1
        return {"prompt_id": int(self._ids[i]), "state": torch.tensor(self._states[chunk][i - self._starts[chunk]]),
                "token_ids": torch.tensor(self._tokens[i].as_py(), dtype=torch.int64)}
