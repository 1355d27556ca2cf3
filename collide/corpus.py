"""Corpus stage: sample prompts as contiguous token windows of documents.

A corpus is a stream of documents ``(doc_id, text)``. Each document gives at most one prompt,
as the reference does: a random contiguous window of ``min_tokens..max_tokens`` tokens
(special tokens excluded), chosen with a generator seeded by ``(seed, doc_id)`` so the same
document always gives the same window. The tokenizer's leading special tokens (e.g. BOS) are
then prepended, so ``Prompt.token_ids`` is exactly what the model sees.

The stream is deterministic for a given config: extraction relies on that to resume.
Documents too short for ``min_tokens`` are skipped. Deduplication by token ids happens in
the extraction stage (``collide.extract``), which counts the drops.
"""

from __future__ import annotations

import codecs
import glob
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Iterator

from omegaconf import OmegaConf

from collide.config import CorpusConfig
from collide.errors import CollideError

KINDS = ("hub", "mix", "stdlib-docs", "stdlib-code", "files")
PARAGRAPH = re.compile(r"\n\s*\n")
SNIFF_BYTES = 1 << 16  # bytes of each text file that check_corpus decodes before a model is loaded


@dataclass(frozen=True)
class Prompt:
    """One prompt: exactly the token ids fed to the model (special tokens such as BOS included)."""

    token_ids: tuple[int, ...]  # what the model sees, BOS included where the tokenizer adds one
    source: str  # "<corpus>:<document id>:<first token offset>"
    text: str  # the window decoded back to text (special tokens excluded)


# --------------------------------------------------------------------------- documents


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in PARAGRAPH.split(text) if p.strip()]


def _shuffled(items: list, seed: int) -> list:
    random.Random(seed).shuffle(items)
    return items


def _buffer_shuffled(docs: Iterable, buffer: int, seed: int) -> Iterator:
    """Approximate shuffle of a stream with a fixed-size buffer (as HF datasets streaming does)."""
    rng, pool = random.Random(seed), []
    for doc in docs:
        pool.append(doc)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    while pool:
        yield pool.pop(rng.randrange(len(pool)))


def stdlib_docs() -> list[tuple[str, str]]:
    """Paragraphs of ``pydoc_data.topics`` (~465k characters of English), ids "topic#i"."""
    from pydoc_data.topics import topics

    return [(f"{topic}#{i}", para) for topic in sorted(topics) for i, para in enumerate(_paragraphs(topics[topic]))]


def stdlib_code() -> list[tuple[str, str]]:
    """The standard library's own ``.py`` files (site-packages excluded), ids = relative paths."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in paths]


def file_paths(cfg: CorpusConfig) -> list[str]:
    """The files ``corpus.data_files`` names (globs expanded), sorted; CollideError if none, or one is not a file."""
    if not cfg.data_files:
        raise CollideError("corpus=files needs its files: set corpus.data_files='[/path/*.jsonl]'")
    paths = sorted({p for pattern in cfg.data_files for p in glob.glob(str(Path(pattern).expanduser()))})
    if not paths:
        raise CollideError(f"corpus.data_files={list(cfg.data_files)} matches no file; check the paths or globs")
    folders = [p for p in paths if not Path(p).is_file()]
    if folders:
        raise CollideError(f"corpus.data_files names {folders[0]}, which is not a file; name the files in it "
                           f"(corpus.data_files='[{folders[0].rstrip('/')}/*.txt]')")
    return paths


def _not_text(path: str, data: bytes, final: bool = True) -> CollideError | None:
    """CollideError naming ``path`` if ``data`` (its first bytes, or all of them with ``final``) is not UTF-8
    text: an undecodable byte, or a NUL (binary files often decode, never hold NULs in text)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
        where = data.find(b"\0")
        reason = None if where < 0 else f"a NUL byte at offset {where}"
    except UnicodeDecodeError as exc:
        reason = f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8"
    if reason is None:
        return None
    return CollideError(f"{path} is not a text file ({reason}); corpus=files reads UTF-8 .txt/.md, .jsonl and "
                        ".parquet files: convert it to UTF-8 or drop it from corpus.data_files")


def _decoded(path: str, data: bytes) -> str:
    problem = _not_text(path, data)
    if problem is not None:
        raise problem
    return data.decode("utf-8")


def _parquet_names(path: str) -> list[str]:
    """The column names of a Parquet file; CollideError naming it if it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise CollideError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]}); pass Parquet "
                           "files with a .parquet suffix, or rename a text file to .txt or .jsonl") from None


def check_corpus(cfg: CorpusConfig) -> None:
    """The checks of a corpus config that need no tokenizer, run before a model is loaded: the window bounds,
    and for corpus=files its files: every one exists and is a file, some hold data, the first ``SNIFF_BYTES``
    of each text file are UTF-8 text, a .jsonl file's first line is an object with the text field, a .parquet
    file has that column. What lies further in a file is checked as it is read."""
    _check_window(cfg)
    if cfg.kind != "files":
        return
    paths = file_paths(cfg)
    if all(Path(p).stat().st_size == 0 for p in paths):
        raise CollideError(f"corpus.data_files={list(cfg.data_files)} holds no text: {', '.join(paths[:3])}"
                           f"{' ...' if len(paths) > 3 else ''} {'is' if len(paths) == 1 else 'are'} empty; "
                           "point corpus.data_files at files with text")
    for path in paths:
        if Path(path).suffix.lower() == ".parquet":
            names = _parquet_names(path)
            if cfg.field not in names:
                raise CollideError(f"{path} has no column {cfg.field!r} (it has {names}); "
                                   "set corpus.field to the text column")
            continue
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
        whole = len(head) < SNIFF_BYTES
        problem = _not_text(path, head, final=whole)
        if problem is not None:
            raise problem
        lines = head.split(b"\n") if whole else head.split(b"\n")[:-1]  # complete lines only
        first = next((line.decode("utf-8") for line in lines if line.strip()), None)
        if Path(path).suffix.lower() == ".jsonl" and first is not None:
            _field(_json_object(first, f"{path}:{lines.index(first.encode()) + 1}"), cfg, path)


def _check_window(cfg: CorpusConfig) -> None:
    if not 1 <= cfg.min_tokens <= cfg.max_tokens:
        raise CollideError(f"corpus.min_tokens={cfg.min_tokens} and corpus.max_tokens={cfg.max_tokens} must satisfy "
                           "1 <= min_tokens <= max_tokens")


def file_documents(cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    """Documents of the user's files: .txt/.md paragraphs, .jsonl rows or .parquet rows (column ``field``)."""
    for path in file_paths(cfg):
        suffix = Path(path).suffix.lower()
        if suffix == ".jsonl":
            with open(path, "rb") as fh:
                for row, raw in enumerate(fh):
                    line = _decoded(f"{path}:{row + 1}", raw)
                    if line.strip():
                        yield f"{path}:{row}", _field(_json_object(line, f"{path}:{row + 1}"), cfg, path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            names = _parquet_names(path)
            if cfg.field not in names:
                raise CollideError(f"{path} has no column {cfg.field!r} (it has {names}); "
                                   "set corpus.field to the text column")
            for row, text in enumerate(pq.read_table(path, columns=[cfg.field]).column(0).to_pylist()):
                yield f"{path}:{row}", _text_value(text, f"{path}:{row}")
        else:
            for i, para in enumerate(_paragraphs(_decoded(path, Path(path).read_bytes()))):
                yield f"{path}#{i}", para


def _json_object(line: str, where: str) -> dict:
    """One .jsonl line as a JSON object; CollideError naming the file and line otherwise."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise CollideError(f"{where}: not valid JSON ({exc}); each .jsonl line must be one JSON object") from None
    if not isinstance(record, dict):
        raise CollideError(f"{where}: a JSON {type(record).__name__}, not an object; each .jsonl line must be "
                           "one JSON object holding the text field")
    return record


def _field(record: dict, cfg: CorpusConfig, where: str) -> str:
    if cfg.field not in record:
        raise CollideError(f"{where}: record has no key {cfg.field!r} (keys: {sorted(record)}); set corpus.field")
    return _text_value(record[cfg.field], where)


def _text_value(value, where: str) -> str:
    """A document's text field: a string (None = an empty document); CollideError naming ``where`` otherwise."""
    if value is None or isinstance(value, str):
        return value or ""
    raise CollideError(f"{where}: the text field holds a value of type {type(value).__name__}, not a string; "
                       "set corpus.field to the column or key that holds the text")


def hub_documents(cfg: CorpusConfig, path_key: str = "corpus.path") -> Iterator[tuple[str, str]]:
    """Stream a Hugging Face dataset (hub id or local directory) in shuffled order.

    ``path_key``: the override that points this corpus at a local copy, named by the offline error.
    """
    try:
        import datasets
    except ImportError as exc:
        raise CollideError(f"corpus={cfg.name} streams from the Hugging Face hub and needs `datasets`: "
                           "pip install 'collide[hub]'") from exc
    where = f"corpus {cfg.name!r} (dataset {cfg.path!r}{', config ' + cfg.config_name if cfg.config_name else ''})"
    try:
        stream = datasets.load_dataset(cfg.path, cfg.config_name, split=cfg.split, streaming=True)
        stream = stream.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
        for row, record in enumerate(stream):
            if cfg.path_suffix and not str(record.get(cfg.path_field or "path", "")).endswith(cfg.path_suffix):
                continue
            yield f"{cfg.path}:{row}", _field(record, cfg, where)
    except CollideError:
        raise
    except Exception as exc:  # datasets raises many types for an unreachable hub
        raise CollideError(
            f"cannot stream {where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"Without hub access, point at a local copy with {path_key}=/path/to/dataset_dir, or use "
            "corpus=files corpus.data_files='[/path/*.jsonl]'") from exc


def documents(cfg: CorpusConfig, path_key: str = "corpus.path") -> Iterator[tuple[str, str]]:
    """The document stream of a single (non-mix) corpus, in its sampling order (``path_key``: see hub_documents)."""
    if cfg.kind == "stdlib-docs":
        return iter(_shuffled(stdlib_docs(), cfg.seed))
    if cfg.kind == "stdlib-code":
        return iter(_shuffled(stdlib_code(), cfg.seed))
    if cfg.kind == "files":
        return _buffer_shuffled(file_documents(cfg), cfg.shuffle_buffer, cfg.seed)
    if cfg.kind == "hub":
        return hub_documents(cfg, path_key)
    raise CollideError(f"corpus.kind={cfg.kind!r} is not supported; use one of {list(KINDS)}")


# --------------------------------------------------------------------------- prompts


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before the text (e.g. [BOS]); [] for tokenizers that add none."""
    with_specials = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start:start + len(plain)] == plain:
            return list(with_specials[:start])
    return []


def windows(docs: Iterable[tuple[str, str]], tokenizer, cfg: CorpusConfig) -> Iterator[Prompt]:
    """One random contiguous window of min_tokens..max_tokens tokens per document."""
    _check_window(cfg)
    prefix = special_prefix(tokenizer)
    for doc_id, text in docs:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) < cfg.min_tokens:
            continue
        rng = random.Random(f"{cfg.seed}:{doc_id}")
        length = rng.randint(cfg.min_tokens, min(cfg.max_tokens, len(ids)))
        start = rng.randint(0, len(ids) - length)
        window = ids[start:start + length]
        yield Prompt(tuple(prefix + window), f"{cfg.name}:{doc_id}:{start}", tokenizer.decode(window))


def load_corpus_config(name: str) -> CorpusConfig:
    """The shipped ``collide/conf/corpus/<name>.yaml``, validated against CorpusConfig."""
    path = files("collide.conf").joinpath("corpus", f"{name}.yaml")
    if not path.is_file():
        raise CollideError(f"unknown corpus {name!r}; choose one of {available('corpus')}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CorpusConfig), OmegaConf.load(str(path))))


def available(group: str) -> list[str]:
    """Names of the shipped configs of a group ("model" or "corpus")."""
    return sorted(p.name.removesuffix(".yaml") for p in files("collide.conf").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


def mixed(cfg: CorpusConfig, tokenizer) -> Iterator[Prompt]:
    """Prompts drawn from ``cfg.components``, each prompt's source corpus chosen uniformly at random."""
    if not cfg.components:
        raise CollideError(f"corpus {cfg.name!r} is a mix with no components; set corpus.components=[c4,pile]")
    stray = sorted(set(cfg.component_paths) - set(cfg.components))
    if stray:
        raise CollideError(f"corpus.component_paths names {stray}, which are not components of {cfg.name!r} "
                           f"({cfg.components}); use component names as keys")
    streams = []
    for name in cfg.components:
        part = load_corpus_config(name)
        if part.kind == "mix":
            raise CollideError(f"corpus {cfg.name!r}: component {name!r} is itself a mix; list plain corpora")
        part.min_tokens, part.max_tokens, part.seed = cfg.min_tokens, cfg.max_tokens, cfg.seed
        if name in cfg.component_paths:
            part.path = cfg.component_paths[name]
        streams.append(windows(documents(part, f"+corpus.component_paths.{name}"), tokenizer, part))
    rng = random.Random(cfg.seed)
    while streams:
        stream = rng.choice(streams)
        try:
            yield next(stream)
        except StopIteration:
            streams.remove(stream)


def iter_prompts(cfg: CorpusConfig, tokenizer) -> Iterator[Prompt]:
    """The deterministic prompt stream of ``cfg`` (duplicates included; extraction drops them)."""
    if cfg.kind == "mix":
        return mixed(cfg, tokenizer)
    return windows(documents(cfg), tokenizer, cfg)
