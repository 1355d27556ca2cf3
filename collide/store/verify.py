"""Check a store's integrity (``collide verify STORE [STORE ...]``): ``verify_store(path)`` lists its problems.

For every shard listed in the manifest it re-computes each file's sha256 and size, reads the
Parquet footers for the row counts and the schemas, and checks that every layer file holds
the same prompt ids as the prompts file, a contiguous range following the previous shard, and
that every positions file (``store.positions=all``) holds each prompt's positions 0..n_tokens-1.
Each problem is one line naming the file.
Needs only pyarrow and numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collide.errors import CollideError
from collide.store import quantized
from collide.store.layout import STORAGE, file_problem, read_manifest, shard_files, stray_files, value_width


def verify_store(path) -> list[str]:
    """Problems found in the store at ``path``, one line each naming the file; empty = ok."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CollideError as exc:
        return [str(exc)]
    problems: list[str] = []
    d, layers, positions = int(manifest["d"]), [int(k) for k in manifest["layers"]], manifest["positions"]
    state_type = pa.list_(STORAGE[manifest["dtype"]][1], value_width(manifest["dtype"], d))
    next_id = 0
    for shard in manifest["shards"]:
        rows, first = int(shard["rows"]), int(shard["first_prompt_id"])
        if first != next_id:
            problems.append(f"{path / 'manifest.json'}: shard {shard['index']} starts at prompt_id {first}, "
                            f"expected {next_id}")
        next_id = first + rows
        expected = shard_files(shard["index"], layers, positions)
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
            prompts = pq.read_table(prompts_file, columns=["prompt_id", "n_tokens"])
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{prompts_file}: unreadable Parquet ({exc})")
            continue
        ids, lengths = prompts.column("prompt_id").to_numpy(), prompts.column("n_tokens").to_numpy()
        if not np.array_equal(ids, want):
            problems.append(f"{prompts_file}: holds {len(ids)} prompt ids, expected {first}..{first + rows - 1}")
        by_position = (np.repeat(ids, lengths), np.concatenate([np.arange(n) for n in lengths]) if rows else ids)
        for i, rel in enumerate(expected[1:]):
            if bad[rel]:
                continue
            file = path / rel
            every_position = i >= len(layers)
            try:
                schema = pq.read_schema(file)
                table = pq.read_table(file, columns=["prompt_id", "position"] if every_position else ["prompt_id"])
            except (OSError, pa.ArrowException, KeyError) as exc:
                problems.append(f"{file}: unreadable Parquet ({exc})")
                continue
            if schema.field("state").type != state_type:
                problems.append(f"{file}: state column is {schema.field('state').type}, expected {state_type}")
            elif manifest["dtype"] in quantized.BITS:  # the codes themselves: every value is read
                codes = pq.read_table(file, columns=["state"]).column("state").combine_chunks().flatten().to_numpy()
                wrong = quantized.problem(codes.reshape(-1, state_type.list_size), manifest["dtype"], d,
                                          manifest["quant_granularity"])
                if wrong:
                    problems.append(f"{file}: {wrong}")
            if not every_position and not np.array_equal(table.column("prompt_id").to_numpy(), ids):
                problems.append(f"{file}: its {table.num_rows} prompt ids differ from those of {prompts_file}")
            if every_position and not (np.array_equal(table.column("prompt_id").to_numpy(), by_position[0]) and
                                       np.array_equal(table.column("position").to_numpy(), by_position[1])):
                problems.append(f"{file}: its {table.num_rows} (prompt_id, position) rows are not positions "
                                f"0..n_tokens-1 of each prompt of {prompts_file}")
    if manifest["counts"]["n_prompts"] != next_id:
        problems.append(f"{path / 'manifest.json'}: counts.n_prompts={manifest['counts']['n_prompts']} but the "
                        f"shards hold {next_id} prompts")
    if manifest["status"] == "complete":
        if next_id != manifest["n_prompts"]:
            problems.append(f"{path / 'manifest.json'}: complete with {next_id} prompts, n_prompts="
                            f"{manifest['n_prompts']}")
        problems += [f"{file}: not listed in the manifest (stray file)" for file in stray_files(path, manifest)]
    return problems
