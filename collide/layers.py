"""The layer convention, and the one grammar of ``layers=`` shared by every command.

``CONVENTION`` is the sentence that every manifest, report and docstring means by "layer k".
Blocks are counted from 1 to L, as in HF ``hidden_states``:

* layer 0 is the embedding output (HF ``hidden_states[0]``), the input of block 1: position
  embeddings and Gemma's sqrt(d) scaling included;
* layer k, 1 <= k <= L, is the output of block k (HF ``hidden_states[k]``);
* layer L is read after the final norm (``model.final_norm=post``, HF's last entry) or before it,
  on the raw residual stream (``pre``, the paper's code).

The grammar: ``all``, an int ``5``, a list ``[0, 5, 30]``, or a range ``"a:b"`` with both ends
included (``"4:"`` runs to L, ``":4"`` starts at 0).
"""

from __future__ import annotations

from collide.errors import CollideError

CONVENTION = ("layer 0 = embedding output (input of block 1); layer k = output of block k; "
              "layer L = last block, read after the final norm (post) or before it (pre)")


def parse_layers(spec, n_layers: int) -> list[int]:
    """The sorted layer indices in 0..L that ``spec`` names, for a model of ``n_layers`` = L blocks."""
    if spec == "all" or spec is None:
        return list(range(n_layers + 1))
    if isinstance(spec, str) and ":" in spec:
        lo, hi = (int(part) if part else default for part, default in zip(spec.split(":"), (0, n_layers)))
        layers = list(range(lo, hi + 1))
    elif isinstance(spec, (int, str)):
        layers = [int(spec)]
    else:
        layers = sorted({int(k) for k in spec})
    bad = [k for k in layers if not 0 <= k <= n_layers]
    if bad or not layers:
        raise CollideError(f"layers={spec!r} is out of range: this model has layers 0..{n_layers} "
                           f"(0 = embeddings, {n_layers} = last); pick layers within that range")
    return sorted(set(layers))


def select_layers(spec, available: list[int]) -> list[int]:
    """The stored layers ``spec`` asks for, read as ``parse_layers`` reads it: "all" and a range "a:b"
    take the ``available`` layers (a store's) within it; an int or a list must name available layers."""
    if spec == "all" or spec is None:
        return list(available)
    wanted = parse_layers(spec, max(available))
    if isinstance(spec, str) and ":" in spec:
        wanted = [k for k in wanted if k in available]
    missing = [k for k in wanted if k not in available]
    if missing or not wanted:
        raise CollideError(f"layers={spec!r}: the store holds layers {list(available)}, not {missing or spec}; "
                           "pick layers among those")
    return wanted


def canonical_spec(spec) -> str:
    """A canonical text of a ``layers`` spec ("all", "a:b", or "0,5,30"), for store identities."""
    if isinstance(spec, (list, tuple)):
        return ",".join(str(k) for k in sorted({int(k) for k in spec}))
    return str(spec)


def layer_list(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for k in sorted(layers):
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def layers_in_words(layers: list[int]) -> str:
    """[4] -> "layer 4"; [1, 4] -> "layers 1, 4"."""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
