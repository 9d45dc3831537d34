"""The store digest: printed by info, checked by verify, pinned by every command that reads a store."""

from __future__ import annotations

import json

import pytest

import logitstore
from logitstore.cli.main import main

from synthetic import fill


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("digest") / "s"
    fill(path, n=40)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_prints_the_digest_and_verify_reports_it(store, capsys):
    digest = logitstore.open(store).digest
    code, out, _ = run(capsys, "info", str(store))
    assert code == 0 and f"  digest        {digest}" in out.splitlines()
    code, out, _ = run(capsys, "info", str(store), "--json")
    assert code == 0 and json.loads(out)["digest"] == digest
    code, out, _ = run(capsys, "verify", str(store), "--json")
    assert code == 0 and json.loads(out)["digest"] == digest


def test_every_reading_command_refuses_another_digest(store, capsys, tmp_path):
    digest = logitstore.open(store).digest
    wrong = "0" * 64
    expected = f"Error: {store} has digest {digest}, not the expected {wrong}\n"
    assert run(capsys, "info", str(store), "--expect-digest", wrong)[::2] == (1, expected)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex-{i}", "prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(40)))
    assert run(capsys, "export", str(store), "--to", "jsonl", "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
               "--expect-digest", wrong)[::2] == (1, expected)
    assert not (tmp_path / "o.jsonl").exists()
    assert run(capsys, "train", "--model", str(tmp_path), "--store", str(store), "--out", str(tmp_path / "run"),
               "--expect-digest", wrong)[::2] == (1, expected)
    code, out, _ = run(capsys, "verify", str(store), "--expect-digest", wrong)
    assert code == 1 and f"  problem: {store} has digest {digest}, not the expected {wrong}" in out.splitlines()
    assert run(capsys, "info", str(store), "--expect-digest", digest)[0] == 0
    code, out, _ = run(capsys, "export", str(store), "--to", "jsonl", "--data", str(data), "--out",
                       str(tmp_path / "o.jsonl"), "--expect-digest", digest.upper())
    assert code == 0 and (tmp_path / "o.jsonl").exists()


def test_the_digest_changes_with_any_commit_and_not_otherwise(tmp_path):
    fill(tmp_path / "s", n=40, shards=[0], finalize=False)
    first = logitstore.open(tmp_path / "s").digest
    assert logitstore.open(tmp_path / "s").digest == first
    fill(tmp_path / "s", n=40, shards=[1], finalize=False)
    second = logitstore.open(tmp_path / "s").digest
    fill(tmp_path / "s", n=40)
    assert len({first, second, logitstore.open(tmp_path / "s").digest}) == 3


def test_a_pinned_store_pickles_with_its_pin(store):
    import pickle

    digest = logitstore.open(store).digest
    reopened = pickle.loads(pickle.dumps(logitstore.open(store, digest=digest)))
    assert reopened._pinned is not None and reopened.digest == digest


def test_the_training_loader_reads_only_the_pinned_contents(store):
    from logitstore.errors import DigestMismatchError
    from logitstore.loader import make_loader

    digest = logitstore.open(store).digest
    loader, _ = make_loader(str(store), 4, digest=digest)
    assert loader.dataset.store.digest == digest and next(iter(loader))["rows"].numel() == 4
    with pytest.raises(DigestMismatchError) as info:
        make_loader(str(store), 4, digest="0" * 64)
    assert str(info.value) == f"{store} has digest {digest}, not the expected {'0' * 64}"
