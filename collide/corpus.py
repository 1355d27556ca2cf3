"""Corpus stage: sample prompts as token-id windows of documents."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """One prompt: exactly the token ids fed to the model (special tokens such as BOS included)."""

    token_ids: tuple[int, ...]  # what the model sees, BOS included where the tokenizer adds one
    source: str  # "<corpus>:<document id>:<first token offset>"
    text: str  # the window decoded back to text (special tokens excluded)
