"""Store surgery for tests: rewrite a listed file and update its manifest entry, so its checksum passes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq


def rewrite_listed_file(store_dir: Path, shard: int, rel: str, table) -> None:
    """Write ``table`` over the store's file ``rel`` of shard ``shard`` and record its new sha256 and size
    in manifest.json: only the content checks (ids, positions) can then tell it is wrong."""
    pq.write_table(table, store_dir / rel)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    data = (store_dir / rel).read_bytes()
    manifest["shards"][shard]["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
