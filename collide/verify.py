"""Check a store's integrity: ``python -m collide.verify STORE [STORE ...]``.

For every shard listed in the manifest it re-computes each file's sha256 and size, reads the
Parquet footers for the row counts and the schemas, and checks that every layer file holds
the same prompt ids as the prompts file, a contiguous range following the previous shard.
Prints ``OK ...`` or one line per problem, naming the file; exits 1 on any problem.
Needs only pyarrow and numpy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collide.errors import CollideError
from collide.store import PROMPTS_DIR, file_problem, layer_dir, part_name, read_manifest

def _ids(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["prompt_id"]).column("prompt_id").to_numpy()


def verify_store(path) -> list[str]:
    """Problems found in the store at ``path``, one line each naming the file; empty = ok."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CollideError as exc:
        return [str(exc)]
    problems: list[str] = []
    d, layers = int(manifest["d"]), [int(k) for k in manifest["layers"]]
    state_type = pa.list_(pa.float32(), d)
    next_id = 0
    for shard in manifest["shards"]:
        rows, first = int(shard["rows"]), int(shard["first_prompt_id"])
        if first != next_id:
            problems.append(f"{path / 'manifest.json'}: shard {shard['index']} starts at prompt_id {first}, "
                            f"expected {next_id}")
        next_id = first + rows
        expected = [f"{PROMPTS_DIR}/{part_name(shard['index'])}"] + \
                   [f"{layer_dir(k)}/{part_name(shard['index'])}" for k in layers]
        if sorted(shard["files"]) != sorted(expected):
            problems.append(f"{path / 'manifest.json'}: shard {shard['index']} lists {sorted(shard['files'])}, "
                            f"expected {sorted(expected)}")
            continue
        bad = {rel: file_problem(path / rel, shard["files"][rel]) for rel in expected}
        problems += [problem for problem in bad.values() if problem]
        if bad[expected[0]]:
            continue
        want = np.arange(first, first + rows)
        prompts_file = path / expected[0]
        try:
            ids = _ids(prompts_file)
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{prompts_file}: unreadable Parquet ({exc})")
            continue
        if not np.array_equal(ids, want):
            problems.append(f"{prompts_file}: holds {len(ids)} prompt ids, expected {first}..{first + rows - 1}")
        for rel in expected[1:]:
            if bad[rel]:
                continue
            file = path / rel
            try:
                schema = pq.read_schema(file)
                layer_ids = _ids(file)
            except (OSError, pa.ArrowException) as exc:
                problems.append(f"{file}: unreadable Parquet ({exc})")
                continue
            if schema.field("state").type != state_type:
                problems.append(f"{file}: state column is {schema.field('state').type}, expected {state_type}")
            if not np.array_equal(layer_ids, ids):
                problems.append(f"{file}: its {len(layer_ids)} prompt ids differ from those of {prompts_file}")
    if manifest["counts"]["n_prompts"] != next_id:
        problems.append(f"{path / 'manifest.json'}: counts.n_prompts={manifest['counts']['n_prompts']} but the "
                        f"shards hold {next_id} prompts")
    if manifest["status"] == "complete":
        if next_id != manifest["n_prompts"]:
            problems.append(f"{path / 'manifest.json'}: complete with {next_id} prompts, n_prompts="
                            f"{manifest['n_prompts']}")
        listed = {rel for shard in manifest["shards"] for rel in shard["files"]}
        for directory in [PROMPTS_DIR] + [layer_dir(k) for k in layers]:
            for file in sorted((path / directory).glob("*")) if (path / directory).is_dir() else []:
                if f"{directory}/{file.name}" not in listed:
                    problems.append(f"{file}: not listed in the manifest (stray file)")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a.startswith("-") for a in args):
        print("usage: python -m collide.verify STORE [STORE ...]\n"
              "Re-checks every shard's sha256, size, row count and prompt ids; exits 1 naming any bad file.")
        return 0 if args and args[0] in ("-h", "--help") else 2
    status = 0
    for store in args:
        problems = verify_store(store)
        if problems:
            status = 1
            for problem in problems:
                print(problem)
            print(f"FAILED {store}: {len(problems)} problem(s)")
        else:
            manifest = read_manifest(store)
            print(f"OK {store}: {len(manifest['shards'])} shards, {manifest['counts']['n_prompts']} prompts, "
                  f"layers {manifest['layers']}, d={manifest['d']}, {manifest['status']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
