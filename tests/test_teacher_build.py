"""`logitstore build --top-k K / --sample-k K`: records equal the model's distribution at every scored position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import logitstore
from logitstore import teacher as T
from logitstore.dpo.reference import BuildConfig, build

from sample_data import write_jsonl
from test_cli_edges import run_main

ROWS = [{"prompt": f"Q{i}: is water wet?", "chosen": " Yes." + " so" * (i % 4), "rejected": " No, never."}
        for i in range(6)]


def _model_logps(model_dir, store, row: int, side: str) -> np.ndarray:
    """log_softmax of the model's logits at the positions that predict each scored completion token of a row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt = store.ragged("prompt_ids", [row])[0].astype(np.int64)
    comp = store.ragged(f"{side}_ids", [row])[0].astype(np.int64)
    ids = torch.from_numpy(np.concatenate([prompt, comp]))[None]
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    at = np.arange(len(prompt) - 1, len(prompt) + len(comp) - 1)  # position p predicts token p + 1
    return torch.log_softmax(logits, dim=-1)[at].numpy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", ROWS)


def _build(model, data, out, **kw):
    kw.setdefault("rows_per_shard", 4)
    build(BuildConfig(model=str(model), data=str(data), out=str(out), max_length=48, device="cpu", **kw),
          progress=False)
    return logitstore.open(out)


def test_top_k_of_the_whole_vocabulary_is_the_distribution(byte_model, data, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(byte_model)).vocab_size
    store = _build(byte_model, data, tmp_path / "full", top_k=vocab, topk_codec="exact", per_token=True,
                   codec="float32")
    assert store.teacher == {"kind": "top_k", "k": vocab, "codec": "exact", "seed": None,
                             "block_positions": 1024, "vocab": vocab}
    for row in (0, 3, 5):
        for side in ("chosen", "rejected"):
            rec = store.top_k(side, [row])
            ids, logps, tail = rec["ids"][0], rec["logps"][0], rec["tail_logp"][0]
            want = _model_logps(byte_model, store, row, side)
            assert ids.shape == want.shape == (int(store.row_values([row])[f"{side}_tokens"][0]), vocab)
            full = np.full_like(want, np.nan)
            np.put_along_axis(full, ids.astype(np.int64), logps.astype(np.float64), axis=1)
            np.testing.assert_allclose(full, want, atol=2e-5, rtol=0)  # float32 logits, float64 log-softmax
            assert np.isneginf(tail).all()
            # the per-token values are the records' values at the tokens that were there
            tokens = store.ragged(f"{side}_ids", [row])[0]
            at_token = full[np.arange(len(tokens)), tokens]
            np.testing.assert_allclose(store.ragged(f"{side}_token_logps", [row])[0], at_token, atol=2e-5)
    assert logitstore.verify(tmp_path / "full").ok


def test_top_k_below_the_vocabulary_keeps_the_tail(byte_model, data, tmp_path):
    store = _build(byte_model, data, tmp_path / "k8", top_k=8, topk_codec="fine")
    for side in ("chosen", "rejected"):
        rec = store.top_k(side, [2])
        want = _model_logps(byte_model, store, 2, side)
        order = np.argsort(-want, axis=1, kind="stable")[:, :8]
        # the same 8 tokens (quantized values may tie and then come smaller id first), each at its value
        np.testing.assert_array_equal(np.sort(rec["ids"][0], axis=1), np.sort(order, axis=1))
        np.testing.assert_allclose(rec["logps"][0], np.take_along_axis(want, rec["ids"][0].astype(np.int64), 1),
                                   atol=2 ** -11 + 2e-5)
        rest = want.copy()
        np.put_along_axis(rest, order, -np.inf, axis=1)
        tail = np.log(np.exp(rest).sum(axis=1))
        np.testing.assert_allclose(rec["tail_logp"][0], tail, atol=2 ** -11 + 2e-5)


def test_sampled_records_are_seeded_by_row_and_side(byte_model, data, tmp_path):
    a = _build(byte_model, data, tmp_path / "a", sample_k=12, seed=5)
    b = _build(byte_model, data, tmp_path / "b", sample_k=12, seed=5, rows_per_shard=2, batch_size=1)
    assert a.teacher["seed"] == 5 and a.teacher["kind"] == "sampled"
    for side in ("chosen", "rejected"):
        ra, rb = a.top_k(side, range(6)), b.top_k(side, range(6))
        for x, y in zip(ra["counts"], rb["counts"]):
            np.testing.assert_array_equal(x, y)  # re-sharded and re-batched: the same draws
        for x, y in zip(ra["ids"], rb["ids"]):
            np.testing.assert_array_equal(x, y)
        assert all((c.sum(axis=1) == 12).all() for c in ra["counts"])
    # row 4's chosen draws are teacher.sample on its logits with stream 2 * row + 0
    want = _model_logps(byte_model, a, 4, "chosen")
    draws = T.sample(want.astype(np.float32), 12, seed=5, stream=8)
    got = a.top_k("chosen", [4])
    np.testing.assert_array_equal(got["ids"][0], draws.ids)
    np.testing.assert_array_equal(got["counts"][0], draws.counts)


@pytest.mark.parametrize("args, message", [
    (["--top-k", "100000"], "Error: --top-k 100000 is larger than the vocabulary (384 tokens)\n"),
    (["--top-k", "0"], "Error: --top-k must be a positive integer, got 0\n"),
    (["--top-k", "4", "--sample-k", "4"],
     "Error: --top-k and --sample-k are two kinds of record; a store holds one: choose one\n"),
    (["--sample-k", "70000"], "Error: --sample-k 70000 is more than the codec holds (at most 65535 draws)\n"),
    (["--top-k", "4", "--prompt-sharing"], "Error: --top-k takes records in the one-pass scoring; drop "
                                           "--prompt-sharing\n"),
])
def test_bad_requests_are_one_line_and_write_nothing(byte_model, data, tmp_path, capsys, args, message):
    out = tmp_path / "s"
    code, _, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out", str(out),
                            "--quiet", *args)
    assert (code, err) == (2, message)
    assert not out.exists()


def _files(path) -> dict:
    import hashlib

    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_interrupted_build_resumes_to_the_same_bytes(byte_model, data, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    _build(byte_model, data, tmp_path / "whole", top_k=5, per_token=True, rows_per_shard=2)
    monkeypatch.setenv("LOGITSTORE_FAULT", "before-commit:1")
    monkeypatch.setenv("LOGITSTORE_FAULT_SIGNAL", "SIGINT")
    with pytest.raises(KeyboardInterrupt):
        _build(byte_model, data, tmp_path / "cut", top_k=5, per_token=True, rows_per_shard=2)
    assert logitstore.open(tmp_path / "cut").committed.tolist() == [True, False, False]
    monkeypatch.delenv("LOGITSTORE_FAULT")
    _build(byte_model, data, tmp_path / "cut", top_k=5, per_token=True, rows_per_shard=2)
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")
    with pytest.raises(logitstore.FingerprintMismatchError, match="was built for a different teacher"):
        _build(byte_model, data, tmp_path / "cut", top_k=6, per_token=True, rows_per_shard=2)


def test_per_token_values_equal_a_build_without_records(byte_model, data, tmp_path):
    plain = _build(byte_model, data, tmp_path / "plain", per_token=True, codec="float32")
    taught = _build(byte_model, data, tmp_path / "taught", per_token=True, codec="float32", sample_k=3)
    rows = np.arange(len(plain))
    for field in ("chosen_token_logps", "rejected_token_logps"):
        for x, y in zip(plain.ragged(field, rows), taught.ragged(field, rows)):
            np.testing.assert_array_equal(x, y)
    for field in ("chosen_logps", "rejected_logps"):
        np.testing.assert_array_equal(plain.row_values(rows)[field], taught.row_values(rows)[field])


def test_verify_with_the_model_recomputes_teacher_records(byte_model, data, tmp_path, capsys):
    import json
    import shutil

    _build(byte_model, data, tmp_path / "k", top_k=4, topk_codec="compact")
    code, out, _ = run_main(capsys, "verify", str(tmp_path / "k"), "--model", str(byte_model), "--data", str(data),
                            "--json")
    assert code == 0 and json.loads(out)["problems"] == []
    # another model's records: the sample check finds them
    other = tmp_path / "other"
    shutil.copytree(byte_model, other)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(other))
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    model.save_pretrained(str(other))
    code, out, _ = run_main(capsys, "verify", str(tmp_path / "k"), "--model", str(other), "--data", str(data),
                            "--json", "--sample", "2")
    problems = json.loads(out)["problems"]
    assert code == 1 and any("chosen teacher records differ from the recomputed log-probs (tolerance 0.0635 nats)"
                             in p for p in problems), problems


def test_info_and_export_of_a_teacher_store(byte_model, data, tmp_path, capsys):
    import json

    _build(byte_model, data, tmp_path / "k", sample_k=2, seed=9)
    code, out, _ = run_main(capsys, "info", str(tmp_path / "k"), "--json")
    teacher = json.loads(out)["teacher"]
    assert code == 0 and (teacher["kind"], teacher["k"], teacher["seed"], teacher["vocab"]) == ("sampled", 2, 9, 384)
    code, out, _ = run_main(capsys, "info", str(tmp_path / "k"))
    assert code == 0 and "  teacher       sampled K=2 (seed 9) of 384 tokens at " in out
    code, _, err = run_main(capsys, "export", str(tmp_path / "k"), "--to", "trl", "--data", str(data), "--out",
                            str(tmp_path / "trl"))
    assert code == 0, err  # the records stay out of the export (TRL's dataset has no column for them)
    assert (tmp_path / "trl" / "dataset_info.json").is_file()


def test_loader_entries_line_up_with_the_scored_positions_of_the_batch(byte_model, tmp_path):
    """What a trainer relies on: the valid entries of `teacher_*`, in row-major order, are the positions
    `hidden[:, :-1][completion_mask[:, 1:]]` of the batch, so the K = V records equal the model's own
    log_softmax there (an empty prompt included: its first completion token is not scored)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from logitstore.loader import make_loader

    rows = [{"id": "empty", "prompt": "", "chosen": "Yes.", "rejected": "No, never."}] + ROWS[:3]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    vocab = AutoConfig.from_pretrained(str(byte_model)).vocab_size
    _build(byte_model, data, tmp_path / "s", top_k=vocab, topk_codec="exact")
    loader, _ = make_loader(str(tmp_path / "s"), 4, shuffle=False, pin_memory=False, teacher=True)
    batch = next(iter(loader))
    model = AutoModelForCausalLM.from_pretrained(str(byte_model), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored = batch["completion_mask"][:, 1:].bool()
    want = torch.log_softmax(logits[:, :-1][scored].double(), dim=-1)
    valid = torch.isfinite(batch["teacher_logps"][..., 0])
    assert int(valid.sum()) == int(scored.sum()) == want.shape[0]
    assert not valid[0, 0] and valid[0, 1]  # the row with the empty prompt: t = 0 is padding
    got = torch.full_like(want, float("nan"))
    got.scatter_(1, batch["teacher_ids"][valid], batch["teacher_logps"][valid].double())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_unpaired_data_takes_records_on_both_sides(byte_model, tmp_path, capsys):
    """`build --top-k` of unpaired data: records of the completion and of the KL completion (scored after the row's
    own prompt), files teacher/completion and teacher/kl_completion, equal to the model's top-k at every scored
    position; KTO trains on the store as on one without records."""
    rows = [{"prompt": f"Q{i}?", "completion": " Yes." + " so" * (i % 3), "label": i % 2 == 0} for i in range(8)]
    data = write_jsonl(tmp_path / "u.jsonl", rows)
    code, _, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                            str(tmp_path / "s"), "--top-k", "4", "--kl-batch-size", "4", "--rows-per-shard", "4",
                            "--max-length", "48", "--device", "cpu", "--quiet")
    assert (code, err) == (0, "")
    store = logitstore.open(tmp_path / "s")
    assert store.header["shard_files"][-2:] == ["teacher/completion", "teacher/kl_completion"]
    for row in (0, 5):
        for side, ids_field, tokens in (("completion", "completion_ids", "completion_tokens"),
                                        ("kl_completion", "kl_completion_ids", "kl_tokens")):
            want = _model_logps(byte_model, store, row, ids_field[:-len("_ids")])  # KL: after the row's prompt
            got = store.top_k(side, [row])["ids"][0]
            assert got.shape == (int(store.row_values([row])[tokens][0]), 4)
            assert np.array_equal(np.sort(got, 1), np.sort(np.argsort(-want, 1, kind="stable")[:, :4], 1))
    assert logitstore.verify(tmp_path / "s").ok
    code, _, err = run_main(capsys, "train", "--model", str(byte_model), "--store", str(tmp_path / "s"), "--out",
                            str(tmp_path / "r"), "--loss", "kto", "--max-steps", "1", "--batch-size", "4")
    assert code == 0, err


def test_unpaired_data_takes_sampled_records_on_both_sides(byte_model, tmp_path, capsys):
    rows = [{"prompt": f"Q{i}?", "completion": " Yes." + " so" * (i % 3), "label": i % 2 == 0} for i in range(8)]
    data = write_jsonl(tmp_path / "u.jsonl", rows)
    code, _, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                            str(tmp_path / "s"), "--sample-k", "6", "--kl-batch-size", "4", "--max-length", "48",
                            "--device", "cpu", "--quiet")
    assert (code, err) == (0, "")
    store = logitstore.open(tmp_path / "s")
    for side, tokens in (("completion", "completion_tokens"), ("kl_completion", "kl_tokens")):
        counts = store.top_k(side, [3])["counts"][0]
        assert counts.shape == (int(store.row_values([3])[tokens][0]), 6) and (counts.sum(axis=1) == 6).all()
    assert logitstore.verify(tmp_path / "s").ok


def test_a_top_k_shard_carries_the_prior_of_its_tail_mass(byte_model, data, tmp_path):
    from logitstore import teacher_store as TS
    from logitstore import topk_codec as C

    store = _build(byte_model, data, tmp_path / "k8", top_k=8, rows_per_shard=3)
    for side in ("chosen", "rejected"):
        for shard, rows in ((0, range(0, 3)), (1, range(3, 6))):
            mass = 0.0
            for row in rows:
                logps = _model_logps(byte_model, store, row, side)
                mass = mass + T.tail_mass(logps, np.argsort(-logps, axis=1, kind="stable")[:, :8])
            want = C.prior_codes(mass).astype(np.float64) * -C.PRIOR_STEP
            got = TS.shard_prior(store, side, rows[1])
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= C.PRIOR_STEP  # float noise may move a code across a rounding edge
            assert np.mean(got == want) > 0.95
    sampled = _build(byte_model, data, tmp_path / "s", sample_k=3)
    assert TS.shard_prior(sampled, "chosen", 0) is None
    logitstore.subset(tmp_path / "k8", tmp_path / "sub", ids=store.ids[:2])
    assert TS.shard_prior(logitstore.open(tmp_path / "sub"), "chosen", 0) is None  # copies carry no prior


@pytest.mark.parametrize("codec", ["standard", "sqrt"])
def test_verify_checks_records_against_the_per_token_values(byte_model, data, tmp_path, codec):
    """Where the token that was there is among the K, a record and the per-token value are one model's."""
    from logitstore.writer import StoreWriter

    path = tmp_path / "k"
    store = _build(byte_model, data, path, top_k=32, topk_codec=codec, per_token=True)
    assert logitstore.verify(path).problems == []
    # the same records with other per-token values (and their sums): rewritten through the writer as a forger would
    writer = StoreWriter.attach(path)
    rows = writer.shard_rows(0)
    part = logitstore.derive.read_rows(store, np.asarray(rows), per_token=False, teacher=True)
    shifted = [v - 0.5 for v in store.ragged("chosen_token_logps", rows)]
    part["chosen_token_logps"], part["rejected_token_logps"] = shifted, store.ragged("rejected_token_logps", rows)
    part["chosen_logps"] = np.array([v.sum(dtype=np.float64) for v in shifted])
    writer.write_shard(0, part)
    problems = [p for p in logitstore.verify(path).problems if not p.startswith("summary.data_bytes")]
    assert len(problems) == 1 and problems[0].startswith("teacher/chosen: ") and (
        "records disagree with chosen_token_logps at the token that was there (first: ") in problems[0], problems
