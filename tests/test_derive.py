"""Stores from stores without a model: content keys, subset, merge, their refusals, and crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import logitstore
from logitstore.cli.main import cli
from logitstore import format as fmt
from logitstore.content_key import content_key
from logitstore.derive import merge, subset
from logitstore.errors import FingerprintMismatchError, InputDataError, UnknownIdError

from cli_process import run_cli
from synthetic import shard_rows

HERE = Path(__file__).parent


def make(path: Path, ids: list[str], seed: int = 0, fingerprint: dict | None = None, **kw) -> Path:
    """A complete synthetic store (per-token, fixed point unless told otherwise)."""
    kw.setdefault("per_token", True)
    writer = logitstore.create(path, ids, fingerprint=fingerprint or {"test": "synthetic"}, vocab_size=32000,
                               max_length=64, rows_per_shard=kw.pop("rows_per_shard", 16), inner_chunk=256, **kw)
    for shard in writer.missing_shards:
        writer.write_shard(shard, shard_rows(writer, shard, seed))
    writer.finalize()
    return path


def everything(store: logitstore.Store, ids: list[str]) -> dict[str, list]:
    """Every stored bit of `ids`: sums, counts, token ids, per-token codes and content keys."""
    rows = store.rows(ids)
    out: dict[str, list] = {k: v.tolist() for k, v in store.row_values(rows).items()}
    out["sum_bits"] = [store.row_values(rows)[f].view(np.uint32).tolist() for f in ("chosen_logps", "rejected_logps")]
    for field in store.fields:
        out[field] = [v.tolist() for v in store.ragged(field, rows, decode=False)]
    out["content_key"] = store.content_keys(rows).tolist()
    return out


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_content_key_follows_its_definition_in_format_md():
    # docs/FORMAT.md, "Content key", written out independently of logitstore/content_key.py
    scoring = {"scorer": "x", "version": 1}
    prompt, chosen, rejected = [1, 5, 70000], [3, 2], []
    settings = b'{"scorer":"x","version":1}'
    h = hashlib.blake2b(digest_size=16)
    h.update(b"logitstore content key v1\n" + len(settings).to_bytes(8, "little") + settings)
    for ids in (prompt, chosen, rejected):
        h.update(len(ids).to_bytes(8, "little") + b"".join(i.to_bytes(4, "little") for i in ids))
    assert content_key(np.array(prompt), np.array(chosen, dtype=np.uint16), rejected, scoring) == h.digest()
    assert content_key(prompt, chosen, rejected, {"scorer": "y", "version": 1}) != h.digest()
    assert content_key(prompt, [3], [2], scoring) != content_key(prompt, [3, 2], [], scoring)  # lengths count


def test_stores_hold_the_content_keys_of_their_token_ids(tmp_path):
    store = logitstore.open(make(tmp_path / "s", [f"ex-{i}" for i in range(40)]))
    assert store.header["fields"]["content_key"] == {"kind": "row", "dtype": "uint8", "width": 16}
    assert store.header["content_key"] == {"version": 1, "scoring": {}}
    assert store.provenance == {"sources": [], "reused": 0, "computed": 40}
    ex = store.example("ex-7")
    assert store.content_keys([7])[0].tobytes() == content_key(ex["prompt_ids"], ex["chosen_ids"],
                                                               ex["rejected_ids"], {})
    assert "content_key" in store.header["shard_files"]  # checksummed in the commit record like every shard file


def test_verify_finds_content_keys_that_disagree_with_the_ids(tmp_path, monkeypatch):
    import logitstore.writer

    monkeypatch.setattr(logitstore.writer, "content_keys", lambda p, c, r, s: np.zeros((len(p), 16), np.uint8))
    make(tmp_path / "forged", [f"ex-{i}" for i in range(20)])
    report = logitstore.verify(tmp_path / "forged")
    assert report.problems == ["content_key disagrees with the stored token ids for 20 examples (first: ex-0)"]


def test_subset_and_merge_round_trip_bit_for_bit(tmp_path):
    ids = [f"ex-{i}" for i in range(100)]
    source = logitstore.open(make(tmp_path / "s", ids))
    keep = [f"ex-{i}" for i in (93, 4, 17, 60, 61, 62, 0, 35)]  # any order; the subset keeps the source's
    (tmp_path / "keep.txt").write_text("\n".join(keep) + "\n")
    a = subset(tmp_path / "s", tmp_path / "a", ids=keep)
    b = subset(tmp_path / "s", tmp_path / "b", exclude=keep + ["not-there"], rows_per_shard=7)
    assert (a.examples, b.examples, b.not_found) == (8, 92, 1)
    store_a, store_b = logitstore.open(tmp_path / "a"), logitstore.open(tmp_path / "b")
    assert store_a.ids == [k for k in ids if k in keep] and store_b.ids == [k for k in ids if k not in keep]
    assert store_a.provenance["reused"] == 8 and store_a.provenance["computed"] == 0
    assert store_a.provenance["sources"][0]["fingerprint_digest"] == source.header["fingerprint_digest"]

    merged = merge([tmp_path / "b", tmp_path / "a"], tmp_path / "m", rows_per_shard=16)
    assert merged.summary().startswith(f"Wrote {tmp_path / 'm'}: 100 pairs (0 computed, 100 reused from 2 stores), "
                                       "7 shards written in ")
    m = logitstore.open(tmp_path / "m")
    assert m.complete and sorted(m.ids) == sorted(ids) and m.ids[:92] == store_b.ids
    assert everything(m, ids) == everything(source, ids)
    assert [(s["reused"], s["path"]) for s in m.provenance["sources"]] == [(92, str(tmp_path / "b")),
                                                                          (8, str(tmp_path / "a"))]
    assert all(logitstore.verify(tmp_path / name).ok for name in ("a", "b", "m"))


def test_merge_keeps_equal_duplicates_once_and_refuses_conflicts(tmp_path):
    make(tmp_path / "a", [f"ex-{i}" for i in range(20)], seed=0)
    make(tmp_path / "same", [f"ex-{i}" for i in range(20)], seed=0)  # same IDs, same content
    make(tmp_path / "other", [f"ex-{i}" for i in range(20)], seed=1)  # same IDs, other content
    result = merge([tmp_path / "a", tmp_path / "same"], tmp_path / "m")
    assert (result.examples, result.duplicates) == (20, 20)
    with pytest.raises(InputDataError, match=r"^example ID 'ex-0' is in .*/a and .*/other with different content$"):
        merge([tmp_path / "a", tmp_path / "other"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_merge_and_subset_refusals(tmp_path):
    make(tmp_path / "a", [f"a-{i}" for i in range(10)])
    make(tmp_path / "fp", [f"b-{i}" for i in range(10)], fingerprint={"test": "other"})
    make(tmp_path / "sums", [f"c-{i}" for i in range(10)], per_token=False)
    with pytest.raises(FingerprintMismatchError, match=r"^cannot merge .*/fp with .*/a: they differ in test$"):
        merge([tmp_path / "a", tmp_path / "fp"], tmp_path / "x")
    with pytest.raises(FingerprintMismatchError, match="differ in per-token values"):
        merge([tmp_path / "a", tmp_path / "sums"], tmp_path / "x")
    with pytest.raises(UnknownIdError, match=r"^1 unknown example ID: 'zz'$"):
        subset(tmp_path / "a", tmp_path / "x", ids=["a-1", "zz"])
    with pytest.raises(InputDataError, match="no pair of .* is left to write"):
        subset(tmp_path / "a", tmp_path / "x", exclude=[f"a-{i}" for i in range(10)])
    assert not (tmp_path / "x").exists()


def test_cli_subset_and_merge(tmp_path):
    make(tmp_path / "s", [f"ex-{i}" for i in range(30)])
    (tmp_path / "ids.txt").write_text("ex-3\nex-1\n\nex-2\n")
    (tmp_path / "dup.txt").write_text("ex-3\nex-3\n")
    run = CliRunner().invoke
    done = run(cli, ["subset", str(tmp_path / "s"), "--out", str(tmp_path / "a"), "--ids", str(tmp_path / "ids.txt")])
    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"Wrote {tmp_path / 'a'}: 3 pairs (0 computed, 3 reused from 1 store), 1 shard")
    done = run(cli, ["subset", str(tmp_path / "s"), "--out", str(tmp_path / "b"), "--exclude-ids",
                     str(tmp_path / "ids.txt")])
    assert done.exit_code == 0, done.output
    done = run(cli, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    assert done.exit_code == 0 and "30 pairs (0 computed, 30 reused from 2 stores)" in done.output
    again = run(cli, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    assert again.output.strip() == f"{tmp_path / 'm'} is already complete (30 pairs); nothing to do."
    info = json.loads(run(cli, ["info", str(tmp_path / "m"), "--json"]).output)
    assert (info["computed"], info["reused"]) == (0, 30)
    assert "values        0 computed, 30 reused; 3 from " in run(cli, ["info", str(tmp_path / "m")]).output

    both = run_cli("subset", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--ids", str(tmp_path / "ids.txt"),
                   "--exclude-ids", str(tmp_path / "ids.txt"))
    assert both.returncode == 2 and "give exactly one of --ids and --exclude-ids" in both.stderr
    dup = run_cli("subset", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--ids", str(tmp_path / "dup.txt"))
    assert (dup.returncode, dup.stderr) == (1, f"Error: {tmp_path / 'dup.txt'}:2: duplicate ID 'ex-3' (first on "
                                               "line 1)\n")
    conflict = run_cli("merge", str(tmp_path / "s"), str(tmp_path / "s"), "--out", str(tmp_path / "x"))
    assert conflict.returncode == 0  # the same store twice: every pair is an equal duplicate
    missing = run_cli("merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"))
    assert (missing.returncode, missing.stderr) == (1, f"Error: no logitstore store at {tmp_path / 'nothing'}\n")


def test_incomplete_sources_are_refused(tmp_path):
    writer = logitstore.create(tmp_path / "part", [f"ex-{i}" for i in range(40)], fingerprint={"test": "synthetic"},
                               vocab_size=32000, max_length=64, rows_per_shard=16, inner_chunk=256)
    writer.write_shard(0, shard_rows(writer, 0))
    with pytest.raises(logitstore.IncompleteStoreError, match=r"part is incomplete \(2 shards missing\); finish its "
                                                              "build first"):
        subset(tmp_path / "part", tmp_path / "x", ids=["ex-1"])


@pytest.mark.parametrize("fault", ["after-commit:1", "before-commit:2"])
def test_kill_9_during_merge_then_rerun_is_identical(tmp_path, fault):
    make(tmp_path / "a", [f"a-{i}" for i in range(40)], seed=0)
    make(tmp_path / "b", [f"b-{i}" for i in range(50)], seed=1)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    command = [sys.executable, "-m", "logitstore.cli.main", "merge", str(tmp_path / "a"), str(tmp_path / "b"),
               "--rows-per-shard", "8"]
    whole = run_cli(*command[3:], "--out", str(tmp_path / "whole"), env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert whole.returncode == 0, whole.stderr
    cut = subprocess.run([*command, "--out", str(tmp_path / "cut")], env={**env, "LOGITSTORE_FAULT": fault},
                         capture_output=True, text=True)
    assert cut.returncode == -9  # SIGKILL at the named point
    partial = logitstore.open(tmp_path / "cut")
    assert not partial.complete and int(partial.committed.sum()) == int(fault.split(":")[1]) + fault.startswith("after")  # shards go in order
    again = run_cli(*command[3:], "--out", str(tmp_path / "cut"), env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert again.returncode == 0, again.stderr
    assert tree_digest(tmp_path / "cut") == tree_digest(tmp_path / "whole")


def test_copied_fixed_point_codes_pass_through_unchanged():
    from logitstore.quantize import encode_fixed
    from logitstore.writer import _fixed_codes

    rng = np.random.default_rng(0)
    floats = [-rng.gamma(0.6, 6.0, n).astype(np.float32) for n in (5, 0, 9, 3)]
    codes = [encode_fixed(v, np.array([len(v)]), fmt.DEFAULT_FIXED_SCALE)[0] for v in floats]
    codes[2] = np.array([65535, 1, 65535, 0, 7, 7, 7, 7, 7], dtype=np.uint16)  # a code re-encoding would change
    mixed = [floats[0], codes[1], codes[2], floats[3]]
    lengths = np.array([len(v) for v in mixed])
    got, clipped = _fixed_codes(mixed, lengths, fmt.DEFAULT_FIXED_SCALE)
    assert got.tolist() == np.concatenate(codes).tolist() and clipped == 0
