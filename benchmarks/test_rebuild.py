"""Rebuilding after a data change: `build --reuse` of the previous store against a full rebuild, same model, data
and machine, each build in its own process. The edit changes 10% of the pairs (a new first turn, so the whole pair
differs), as a cleaning pass or a fix to some prompts would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workloads import make_model_in_child, run_child, valid_rows

HERE = Path(__file__).resolve().parent
CHANGED_EVERY = 10  # one pair in ten


@pytest.fixture(scope="module")
def edited_setting(quick, workload_processes, tmp_path_factory):
    from corpus import raw_pairs

    folder = tmp_path_factory.mktemp("reuse")
    model = folder / "model"
    # The deeper model: transformer layers dominate the compute, as in real models.
    make_model_in_child(model, "small" if quick else "deep")
    max_length = 128 if quick else 1024  # run once (quick): 14 of the first 20 hh-rlhf pairs fit, 2 edited
    _, rows = raw_pairs(20 if quick else 200)
    rows = [{"id": f"p{i}", **r} for i, r in enumerate(valid_rows(rows, str(model), max_length))]
    edited = [dict(r, chosen="\n\nHuman: Hi.\n\nAssistant: Hello." + r["chosen"],
                   rejected="\n\nHuman: Hi.\n\nAssistant: Hello." + r["rejected"]) if i % CHANGED_EVERY == 0 else r
              for i, r in enumerate(rows)]
    still_valid = {r["id"] for r in valid_rows(edited, str(model), max_length)}  # a longer prompt may not fit
    rows, edited = ([r for r in data if r["id"] in still_valid] for data in (rows, edited))
    for name, data in (("old", rows), ("edited", edited)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    common = {"model": str(model), "max_length": max_length, "batch_size": 8, "share_prompt": True,
              "bucketing": True}
    run_child("build", {**common, "data": str(folder / "old.jsonl"), "out": str(folder / "old.lstore")})
    return {"folder": folder, "common": common, "pairs": len(rows),
            "changed": sum(1 for a, b in zip(rows, edited) if a != b)}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full rebuild", "build --reuse"])
def test_rebuild_after_a_10_percent_change(benchmark, edited_setting, variant):
    s = edited_setting
    folder = s["folder"]
    out = folder / ("full.lstore" if variant == "full rebuild" else "reuse.lstore")
    args = {**s["common"], "data": str(folder / "edited.jsonl"), "out": str(out)}
    if variant == "build --reuse":
        args["reuse"] = [str(folder / "old.lstore")]
    result: dict = {}

    def run():
        result.update(run_child("build", args))

    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(group="reuse", pairs=s["pairs"], changed=s["changed"], **result)
    assert s["changed"] > 0  # the edit reaches pairs that still fit
    expected_scored = s["changed"] if variant == "build --reuse" else s["pairs"]
    assert result["pairs_scored"] == expected_scored  # the model ran on exactly the changed pairs
