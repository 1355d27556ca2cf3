"""Prompt sampling: deterministic windows of real text, local files, offline hub errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collide.config import CorpusConfig
from collide.corpus import iter_prompts, load_corpus_config, special_prefix
from collide.errors import CollideError
from collide.models import byte_tokenizer

TOK = byte_tokenizer()
BOS = 256


def take(stream, n):
    return [p for _, p in zip(range(n), stream)]


def test_stdlib_docs_windows_are_deterministic_and_in_range():
    cfg = load_corpus_config("stdlib-docs")
    first, again = take(iter_prompts(cfg, TOK), 50), take(iter_prompts(cfg, TOK), 50)
    assert first == again
    for p in first:
        assert p.token_ids[0] == BOS and BOS not in p.token_ids[1:]
        assert cfg.min_tokens <= len(p.token_ids) - 1 <= cfg.max_tokens
        assert TOK.decode(list(p.token_ids[1:])) == p.text
        assert p.source.startswith("stdlib-docs:")
    assert len({p.source.split(":")[1].split("#")[0] for p in first}) > 10  # shuffled across topics


def test_seed_changes_the_sample():
    cfg = load_corpus_config("stdlib-docs")
    other = CorpusConfig(**{**cfg.__dict__, "seed": 1})
    assert take(iter_prompts(cfg, TOK), 20) != take(iter_prompts(other, TOK), 20)


def test_stdlib_code_gives_python_source():
    prompts = take(iter_prompts(load_corpus_config("stdlib-code"), TOK), 30)
    assert len(prompts) == 30 and all(p.source.split(":")[1].endswith(".py") for p in prompts)


def test_mix_draws_from_every_component():
    cfg = CorpusConfig(name="mix", kind="mix", components=["stdlib-docs", "stdlib-code"])
    sources = {p.source.split(":")[0] for p in take(iter_prompts(cfg, TOK), 40)}
    assert sources == {"stdlib-docs", "stdlib-code"}


def test_files_corpus_reads_jsonl_parquet_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"json document number {i} " * 3})
                                                for i in range(5)))
    pq.write_table(pa.table({"body": [f"parquet row {i} with enough words" for i in range(4)]}),
                   tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("first paragraph of plain text\n\nsecond paragraph of plain text")
    cfg = CorpusConfig(name="mine", kind="files", data_files=[str(tmp_path / "*")], field="body", min_tokens=4)
    prompts = list(iter_prompts(cfg, TOK))
    assert len(prompts) == 5 + 4 + 2
    for name, count in [("a.jsonl", 5), ("b.parquet", 4), ("c.txt", 2)]:
        assert sum(f"{tmp_path / name}" in p.source for p in prompts) == count
    documents = [f"json document number {i} " * 3 for i in range(5)]
    documents += [f"parquet row {i} with enough words" for i in range(4)]
    documents += ["first paragraph of plain text", "second paragraph of plain text"]
    for p in prompts:  # each prompt is a window of the document its source names (the window is seeded per path)
        assert any(p.text in doc for doc in documents), p


def test_files_corpus_errors_name_the_input(tmp_path):
    with pytest.raises(CollideError, match="matches no file"):
        list(iter_prompts(CorpusConfig(name="f", kind="files", data_files=[str(tmp_path / "*.jsonl")]), TOK))
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}))
    with pytest.raises(CollideError, match=r"no key 'text'.*corpus.field"):
        list(iter_prompts(CorpusConfig(name="f", kind="files", data_files=[str(tmp_path / "a.jsonl")]), TOK))
    for bad, says in [('{"text": "fine words here"}\n{"text": oops}\n', "not valid JSON"),
                      ('{"text": "fine words here"}\n["a list"]\n', "a JSON list, not an object")]:
        (tmp_path / "b.jsonl").write_text(bad)
        with pytest.raises(CollideError, match=f"b.jsonl:2: {says}") as err:
            list(iter_prompts(CorpusConfig(name="f", kind="files", data_files=[str(tmp_path / "b.jsonl")]), TOK))
        assert "\n" not in str(err.value)


def test_offline_hub_corpus_names_the_dataset_and_the_fix():
    with pytest.raises(CollideError, match=r"allenai/c4.*corpus\.path=") as err:
        next(iter_prompts(load_corpus_config("c4"), TOK))
    assert "\n" not in str(err.value)


def local_hub_copy(root, column: str, n: int = 40):
    """A dataset directory as a hub clone holds it (data/train-*.parquet), made by the test.

    Document i repeats one character of its own, so any window of it tells which document it is.
    """
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({column: [chr(ord("A") + i) * 40 for i in range(n)]}),
                   root / "data" / "train-00000-of-00001.parquet")
    return root


def test_hub_corpus_streams_a_local_copy_through_datasets(tmp_path, compose):
    pile = local_hub_copy(tmp_path / "pile", "text")
    cfg = compose(["corpus=pile", f"corpus.path={pile}", "corpus.shuffle_buffer=8"]).corpus
    prompts = list(iter_prompts(cfg, TOK))
    assert prompts == list(iter_prompts(cfg, TOK))  # deterministic, so a run can resume
    assert {p.source.rsplit(":", 2)[0] for p in prompts} == {f"pile:{pile}"}  # corpus:path:row:window start
    order = [ord(p.text[0]) - ord("A") for p in prompts]
    assert all(set(p.text) == {p.text[0]} for p in prompts)  # a window of one document
    assert sorted(order) == list(range(40)) and order != sorted(order)  # every document once, shuffled


def test_mix_reads_local_copies_of_its_components(tmp_path, compose):
    pile = local_hub_copy(tmp_path / "pile", "text")
    code = local_hub_copy(tmp_path / "gh", "code")  # github-python's text column is `code`
    cfg = compose(["corpus=mix", "corpus.components=[pile,github-python]",
                   f"+corpus.component_paths={{pile: '{pile}', github-python: '{code}'}}"]).corpus
    sources = [p.source for p in take(iter_prompts(cfg, TOK), 30)]
    assert {s.rsplit(":", 2)[0] for s in sources} == {f"pile:{pile}", f"github-python:{code}"}
    offline = CorpusConfig(name="mix", kind="mix", components=["pile", "c4"], component_paths={"pile": str(pile)})
    with pytest.raises(CollideError, match=r"allenai/c4.* \+corpus\.component_paths\.c4=") as err:
        list(iter_prompts(offline, TOK))
    assert "\n" not in str(err.value)


def test_unknown_corpus_lists_choices():
    with pytest.raises(CollideError, match="stdlib-docs"):
        load_corpus_config("wikipedai")


def test_special_prefix_of_a_tokenizer_without_bos():
    class NoBos:
        def __call__(self, text, add_special_tokens=True):
            return type("Enc", (), {"input_ids": [ord(c) for c in text]})()

    assert special_prefix(TOK) == [BOS] and special_prefix(NoBos()) == []
