"""What `logitstore info` reports about a store: sizes, completeness, token statistics, fingerprint, settings."""

from __future__ import annotations

from typing import Any

import numpy as np

from .reader import Store


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(store: Store) -> dict[str, Any]:
    """A JSON-ready summary of `store` (token statistics over its committed shards)."""
    header = store.header
    total = store.location.total_bytes()
    n = len(store)
    committed_rows = np.repeat(store.committed, store.geometry.rows_per_shard)[:n]
    tokens: dict[str, Any] = {}
    for field in store.kind.token_fields:
        off = store.offsets(field)[committed_rows]
        lens = off[:, 1] - off[:, 0]
        tokens[field] = {"total": int(lens.sum()), "mean": float(lens.mean()) if lens.size else 0.0,
                         "max": int(lens.max()) if lens.size else 0}
    all_tokens = sum(t["total"] for t in tokens.values())
    return {
        "path": store.location.url,
        "format_version": header["format_version"],
        "kind": store.kind.name,  # "pairs" (DPO) or "unpaired" (KTO, BCO)
        "kl_batch_size": store.kl_batch_size,  # unpaired: the chunk KL completions are paired within
        "examples": n,
        "complete": store.complete,
        "shards": store.geometry.num_shards,
        "missing_shards": store.missing_shards,
        "fields": {name: entry for name, entry in header["fields"].items()},
        "bytes": int(total),
        "bytes_per_pair": total / n if n else 0.0,
        "bytes_per_token": total / all_tokens if all_tokens else 0.0,
        "tokens": tokens,
        "fingerprint": header["fingerprint"],
        "fingerprint_digest": header["fingerprint_digest"],
        "digest": store.digest,
        "settings": header.get("settings", {}),
        "tokenizer": header.get("tokenizer", {}),
        "created": header.get("created"),
        "skipped": len(header.get("skipped", [])),
        "computed": header.get("provenance", {}).get("computed"),
        "reused": header.get("provenance", {}).get("reused"),
        "provenance": header.get("provenance"),
        "summary": header.get("summary"),
        "teacher": teacher_summary(store),
    }


def teacher_summary(store: Store) -> dict[str, Any] | None:
    """The header's teacher entry with the bytes its files take (committed shards) per scored position."""
    from . import format as fmt

    entry = store.teacher
    if entry is None:
        return None
    table = store.commit_table()
    columns = [j for j, name in enumerate(store._meta.shard_files) if name.startswith("teacher/")]
    size = sum(int(fmt.commit_file(row, j)[0]) for row in table if row[0] == 1 for j in columns)
    rows = np.flatnonzero(np.repeat(store.committed, store.geometry.rows_per_shard)[:len(store)])
    values = store.row_values(rows)
    positions = sum(int(values[side.tokens].astype(np.int64).sum()) for side in store.kind.sides)
    return dict(entry, bytes=size, positions=positions, bytes_per_position=size / positions if positions else 0.0)


def render(s: dict[str, Any]) -> str:
    """The summary from :func:`describe` as the text `logitstore info` prints."""
    state = "complete" if s["complete"] else f"INCOMPLETE: {len(s['missing_shards'])} of {s['shards']} shards missing"
    fp = s["fingerprint"]
    model = fp.get("model", {})
    lines = [
        f"{s['path']}  (format v{s['format_version']}, {s['kind']}"
        + (f", KL batch size {s['kl_batch_size']}" if s.get("kl_batch_size") else "") + f", {state})",
        f"  examples      {s['examples']:,} in {s['shards']} shards" + (f", {s['skipped']} skipped" if s["skipped"] else ""),
        f"  size          {human_bytes(s['bytes'])}  ({human_bytes(s['bytes_per_pair'])} per {'pair' if s.get('kind', 'pairs') == 'pairs' else 'example'}, "
        f"{s['bytes_per_token']:.2f} B per token)",
        "  fields        " + ", ".join(f"{k} ({v['dtype']}{', ' + v['codec'] if 'codec' in v else ''})"
                                      for k, v in s["fields"].items()),
        "  tokens        " + ", ".join(f"{k.replace('_ids', '')} {v['total']:,} (mean {v['mean']:.1f}, max {v['max']})"
                                      for k, v in s["tokens"].items()),
        f"  model         {model.get('type')} ({len(model.get('weights', {}))} weight files), "
        f"precision {fp.get('precision')}, adapter {'yes' if fp.get('adapter') else 'no'}",
        f"  tokenization  {fp.get('tokenization')}",
        f"  data          {fp.get('data')}",
        ("  values        not recorded" if s["provenance"] is None else
         f"  values        {s['computed']:,} computed, {s['reused']:,} reused"
         + "".join(f"; {src['reused']:,} from {src['path']} ({src['digest'][:12]})"
                   for src in s["provenance"].get("sources", []))),
        f"  fingerprint   {s['fingerprint_digest'][:16]}",
        f"  digest        {s['digest']}",
        f"  settings      {s['settings']}",
        *([] if not s.get("teacher") else [_teacher_line(s["teacher"])]),
        f"  created       {s['created']}",
    ]
    from logitstore.errors import printable

    return "\n".join(printable(line) for line in lines)  # IDs and fingerprint values cannot drive the terminal


def _teacher_line(t: dict[str, Any]) -> str:
    what = (f"top-{t['k']} ({t['codec']})" if t["kind"] == "top_k" else f"sampled K={t['k']} (seed {t['seed']})")
    return (f"  teacher       {what} of {t['vocab']:,} tokens at {t['positions']:,} positions: "
            f"{human_bytes(t['bytes'])} ({t['bytes_per_position']:.1f} B per position)")
