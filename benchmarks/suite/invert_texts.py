"""Evaluation prompts of the inversion benchmarks: real English prose no lens is fit on, and random token ids.

Prose: the first prose paragraph of the module docstring of each standard-library module file (read
with ``ast``, nothing imported), in sorted path order, cut to its first T tokens. The lens is fit
on the default corpus (``stdlib-docs``: ``pydoc_data.topics``, the language reference topics), which
holds none of these docstrings. Random ids: uniform over the distinct input rows, seeded.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

import numpy as np

PROSE = re.compile(r"^[A-Za-z][A-Za-z0-9 ,.;:'\"()\-\n]+$")


def docstring_paragraphs() -> list[tuple[str, str]]:
    """(module path, paragraph) of each stdlib module whose docstring has a plain-prose paragraph, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for para in (doc or "").split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= 120 and PROSE.match(para) and "::" not in para:
                out.append((str(path.relative_to(root)), para))
                break
    return out


def prose_prompts(tokenizer, n: int, length: int = 20) -> list[tuple[list[int], str]]:
    """(token ids, source) of ``n`` prose prompts of exactly ``length`` tokens (the tokenizer's BOS included)."""
    prompts = []
    for where, para in docstring_paragraphs():
        if len(prompts) >= n:
            break
        ids = tokenizer(para).input_ids[:length]
        if len(ids) == length:
            prompts.append((ids, where))
    return prompts


def random_prompts(distinct: np.ndarray, n: int, length: int = 20, seed: int = 0, bos=None) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids drawn uniformly from ``distinct`` (BOS first when given)."""
    rng = np.random.default_rng(seed)
    head = [] if bos is None else [int(bos)]
    return [head + rng.choice(distinct, length - len(head)).tolist() for _ in range(n)]
