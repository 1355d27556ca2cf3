"""The converted-model cache: a GGUF checkpoint de-quantized once, then read back as safetensors.

Loading a GGUF checkpoint (``model.gguf_file``: the embedded ``smollm2`` and ``gemma3-270m``) builds
the tokenizer from the GGUF vocabulary and de-quantizes every tensor through transformers: about
19 s for SmolLM2-135M and 49 s for Gemma-3 270M on 2 cores. ``collide.models.load_model`` does that
once per checkpoint and compute dtype, saves what transformers produced (the de-quantized weights in
the compute dtype, ``model.safetensors``; the config; the tokenizer's own files, ``save_pretrained``)
to a content-keyed directory

    <root>/<model name>-<12 hex digits of the key>/      root = $COLLIDE_CACHE/models (default runs/models)

and reads that directory on every load, the first one included. The key (``cache_key``) covers the
GGUF file's sha256 (``collide.digests``: read once per version of the file), the compute dtype, the
versions of transformers, torch and gguf (which de-quantize) and ``FORMAT``: another checkpoint,
dtype or library version converts again. The cache is no part of a store's or a lens's identity:
the cached model computes bitwise the states of the GGUF path, and its tokenizer the same ids
(tests/test_model_cache.py).

**Writing.** Everything goes into a temporary sibling ``.<name>-<hash>.tmp-<pid>``; each file is
hashed and fsynced, ``collide-cache.json`` (the key, and each file's sha256 and size) is written
last with ``collide.atomic``, then the directory is renamed into place, so a killed conversion
leaves nothing that looks whole. **Reading** checks the manifest, the key, and every listed
file's size and sha256 (through the digest memo); a damaged or partial entry is refused in one log
line, removed and converted again. ``collide models`` lists, verifies and clears the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from collide import digests
from collide.atomic import atomic_write_json, fsync_dir, sha256_of
from collide.config import cache_path

log = logging.getLogger(__name__)

FORMAT = "1"  # bumped when what a cache directory holds changes meaning
MANIFEST = "collide-cache.json"
TMP_MARK = ".tmp-"  # a directory being written: .<name>-<hash>.tmp-<pid>


def root() -> Path:
    """Where converted models live: ``$COLLIDE_CACHE/models`` (``runs/models`` without the variable)."""
    return Path(cache_path("models"))


def cache_key(gguf: Path, dtype: str) -> dict:
    """What a converted model depends on: the GGUF file's content, the compute dtype, the converting libraries."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {"format": FORMAT, "gguf_file": Path(gguf).name, "gguf_sha256": digests.sha256(gguf), "dtype": str(dtype),
            "transformers": installed("transformers"), "torch": installed("torch"), "gguf": installed("gguf")}


def location(name: str, key: dict) -> Path:
    """``<root>/<name>-<12 hex digits of the sha256 of the key's canonical JSON>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return root() / f"{name}-{digest}"


def problem(directory: Path, key: dict | None = None, fresh: bool = False) -> str | None:
    """None when ``directory`` is a whole cache entry (of ``key``, when given); else what is wrong, in a phrase."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except OSError:
        return f"{MANIFEST} is missing (a partial write)"
    except ValueError:
        return f"{MANIFEST} is not valid JSON"
    if key is not None and manifest.get("key") != key:
        return f"{MANIFEST} records another checkpoint, dtype or library version"
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return f"{MANIFEST} lists no model.safetensors"
    return digests.check(directory, files, fresh)


def find(name: str, key: dict) -> Path | None:
    """The verified cache directory of ``key``, or None. A damaged one is refused in one log line and removed."""
    directory = location(name, key)
    if not directory.exists():
        return None
    wrong = problem(directory, key)
    if wrong is None:
        return directory
    log.warning("converted-model cache %s is damaged (%s): removing it and converting the GGUF file again",
                directory, wrong)
    shutil.rmtree(directory, ignore_errors=True)
    return None


def _save(model, tokenizer, directory: Path) -> None:
    """``save_pretrained`` of both. transformers refuses to save a model it loaded from GGUF (its quantizer is
    marked not serializable) although its weights are plain de-quantized tensors: the quantizer and the
    config's ``quantization_config`` are set aside while saving, and put back."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    quant_config = config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        model.save_pretrained(directory)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            config.quantization_config = quant_config
    tokenizer.save_pretrained(directory)
    # The added tokens in tokenizer_config.json too (transformers 5 leaves them to tokenizer.json alone, which a
    # load then parses a second time: 0.85 s of Gemma-3's 33 MB). The same records save_pretrained serializes.
    settings = directory / "tokenizer_config.json"
    if settings.is_file() and getattr(tokenizer, "added_tokens_decoder", None):
        doc = json.loads(settings.read_text())
        doc.setdefault("added_tokens_decoder", {str(i): token.__getstate__()
                                                for i, token in tokenizer.added_tokens_decoder.items()})
        atomic_write_json(settings, doc)


def write(name: str, key: dict, tokenizer, model) -> Path:
    """Save a freshly converted ``model`` and ``tokenizer`` as the cache entry of ``key`` (see the module
    docstring); returns its directory. OSError propagates (the caller goes on without the cache)."""
    final = location(name, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stray in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        if not _alive(stray):
            shutil.rmtree(stray, ignore_errors=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save(model, tokenizer, tmp)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                digest, size = sha256_of(f)
                os.fsync(f.fileno())
            files[str(path.relative_to(tmp))] = {"sha256": digest, "bytes": size}
        atomic_write_json(tmp / MANIFEST, {"name": name, "key": key, "files": files})
        try:
            os.rename(tmp, final)
        except OSError:
            if problem(final, key) is not None:  # not a whole entry written meanwhile by another process
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for rel, rec in files.items():
        digests.remember(final / rel, rec["sha256"])  # hashed as written: the next load need not read them
    return final


def _alive(tmp: Path) -> bool:
    """Whether the process that is writing ``tmp`` (its name ends in .tmp-<pid>) still runs on this machine."""
    try:
        os.kill(int(tmp.name.rsplit(TMP_MARK, 1)[1]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def read(directory: Path, dtype, placed: dict):
    """(tokenizer, model) from a cache directory; ``dtype`` a torch dtype, ``placed`` device-placement kwargs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(str(directory)),
            AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **placed))


def remove(path: Path) -> None:
    """Remove one cache directory: its model is converted again on its next load."""
    shutil.rmtree(path, ignore_errors=True)


def size(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human(n: int) -> str:
    """Bytes as MiB or GiB, e.g. '513 MiB', '1.6 GiB'."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def entries(name: str | None = None) -> list[dict]:
    """The cache's directories (of model ``name``, or all), each {"name", "path", "bytes", "state", "key"};
    state is "ok" (a manifest whose files have their recorded sizes), "damaged" or "partial" (being written,
    or left by a killed conversion). Sizes only: ``problem(path, fresh=True)`` re-hashes."""
    found = []
    base = root()
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        if not path.is_dir():
            continue
        partial = TMP_MARK in path.name
        entry_name = (path.name.lstrip(".").rsplit(TMP_MARK, 1)[0] if partial else path.name).rsplit("-", 1)[0]
        if name is not None and entry_name != name:
            continue
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None
        whole = manifest is not None and all(
            (path / rel).is_file() and (path / rel).stat().st_size == rec.get("bytes")
            for rel, rec in (manifest.get("files") or {}).items())
        state = "partial" if partial or manifest is None else "ok" if whole else "damaged"
        found.append({"name": entry_name, "path": path, "bytes": size(path), "state": state,
                      "key": (manifest or {}).get("key", {}), "writing": partial and _alive(path)})
    return found


def describe(directory: Path) -> str:
    """'<dir> (513 MiB; the cache holds 2 models, 1.5 GiB in <root>)': for the log line of a load."""
    held = [e for e in entries() if e["state"] == "ok"]
    return (f"{directory} ({human(size(directory))}; the cache holds {len(held)} model{'s' * (len(held) != 1)}, "
            f"{human(sum(e['bytes'] for e in held))} in {root()})")
