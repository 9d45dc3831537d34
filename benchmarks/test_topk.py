"""The teacher-record benchmark (benchmarks/topk.py) runs and its figures hang together, on two pairs."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # full 32,000-token distributions at every position
def test_topk_benchmark_runs_and_orders_its_figures():
    from topk import run, table

    result = run(pairs=2, codecs=("exact", "compact", "sqrt"))
    rows = {(r["kind"], r["k"], r["codec"]): r for r in result["rows"]}
    kls = [rows[("top", k, "exact")]["kl"] for k in (1, 8, 32, 64, 128)]
    assert kls == sorted(kls, reverse=True) and kls[-1] > 0  # more tokens, closer to the teacher
    for k in (1, 8, 32, 64, 128):  # a coarser value step costs fidelity and saves bytes
        assert rows[("top", k, "compact")]["kl"] >= rows[("top", k, "exact")]["kl"] - 1e-9
        assert rows[("top", k, "compact")]["bytes_per_token"] < rows[("top", k, "exact")]["bytes_per_token"]
    for k in (1, 8, 32, 64, 128):  # the shard's prior spreads the tail closer to the teacher than evenly
        assert rows[("top", k, "exact")]["kl_prior"] < rows[("top", k, "exact")]["kl"]
        assert rows[("top", k, "sqrt")]["bytes_per_token"] < rows[("top", k, "compact")]["bytes_per_token"] or k == 1
    for r in result["rows"]:
        assert 0 < r["grad_cosine"] <= 1 + 1e-6
        if r["codec"] == "exact":  # over K + 1 buckets the loss is a lower bound of the full one
            assert 0 < r["loss_ratio"] <= 1 + 1e-6
    assert "| sampled K=12 | - |" in table(result)


@pytest.mark.slow  # trains a tiny transformer for two steps: a smoke test of the contextual teacher's path
def test_topk_benchmark_transformer_teacher_smoke():
    from topk import goal, run

    result = run(pairs=1, codecs=("exact", "sqrt"), teacher_kind="transformer", lm_steps=2, top_k=(8, 128),
                 sample_k=(12,))
    rows = {(r["kind"], r["k"], r["codec"]): r for r in result["rows"]}
    assert set(rows) == {("top", 8, "exact"), ("top", 8, "sqrt"), ("top", 128, "exact"), ("top", 128, "sqrt"),
                         ("sample", 12, "-")}
    for k in (8, 128):  # a two-step model is nearly uniform: no claim on which reconstruction is closer here
        r = rows[("top", k, "sqrt")]
        assert 0 <= r["kl_prior"] < 10 and 0 <= r["kl"] < 10 and r["bytes_per_token"] < rows[("top", k, "exact")][
            "bytes_per_token"]
        assert r["bytes_per_token_here"] > r["bytes_per_token_shard"] > r["bytes_per_token"]
    assert goal(result)["reference_kl"] == rows[("top", 128, "exact")]["kl"]
