"""`logitstore train --loss distill / tdpo1 / tdpo2`: its options' usage errors and the one-line runtime errors of
stores that cannot serve them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from logitstore.cli.main import cli
from logitstore.dpo.kinds.teacher import check_teacher, check_teacher_vocabulary
from logitstore.dpo.objectives.objective import Objective
from logitstore.dpo.reference import BuildConfig, build
from logitstore.errors import LogitstoreError
from sample_data import implicit_rows, write_jsonl
from test_unpaired_store import unpaired_rows


def fake_store(kind="pairs", teacher=None):
    return SimpleNamespace(kind=SimpleNamespace(name=kind), teacher=teacher,
                           location=SimpleNamespace(url="/data/s.lstore"))


@pytest.mark.parametrize("args,message", [
    (["--loss", "sigmoid", "--distill-beta", "0.5"], "--distill-beta only applies to the distill loss"),
    (["--loss", "distill", "--distill-beta", "2"], "--distill-beta must be in [0, 1], got 2.0"),
    (["--loss", "tdpo1", "--tdpo-alpha", "0.5"], "--tdpo-alpha only applies to the tdpo2 loss (TDPO1 has no α)"),
    (["--loss", "kto", "--distill-beta", "0"], "--distill-beta does not apply to kto (a DPO option)"),
    (["--loss", "distill,kto"], "kto trains on an unpaired store and cannot be combined with other losses"),
    (["--loss", "sigmoid,distill", "--loss-weights", "1"], "--loss-weights gives 1 weight for 2 --loss types "
                                                          "(sigmoid, distill); give one weight per type, in the same "
                                                          "order"),
])
def test_option_refusals_are_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["train", "--model", "unused", "--store", str(tmp_path / "s"), "--out",
                                      str(tmp_path / "r"), *args])
    assert result.exit_code == 2
    assert f"Error: {message}" in result.output
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def plain_stores(byte_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    build(BuildConfig(model=str(byte_model), data=str(write_jsonl(folder / "p.jsonl", implicit_rows(4))),
                      out=str(folder / "pairs"), max_length=128), progress=False)
    build(BuildConfig(model=str(byte_model), data=str(write_jsonl(folder / "u.jsonl", unpaired_rows(4))),
                      out=str(folder / "kto"), max_length=128, kl_batch_size=2), progress=False)
    return folder / "pairs", folder / "kto"


def run_cli(args, capsys) -> tuple[int, list[str]]:
    from logitstore.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["train", *args, "--quiet"])
    return done.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("loss", ["distill", "sigmoid,tdpo2"])
def test_a_store_without_teacher_records_is_one_line(byte_model, plain_stores, tmp_path, loss, capsys):
    pairs, _ = plain_stores
    code, err = run_cli(["--model", str(byte_model), "--store", str(pairs), "--out", str(tmp_path / "r"), "--loss",
                         loss, "--max-steps", "1", "--batch-size", "2"], capsys)
    assert code == 1
    assert err == [f"Error: {pairs} holds no top-k teacher records; rebuild with --top-k K (or --sample-k K)"]
    assert not (tmp_path / "r").exists()


def test_distill_on_an_unpaired_store_is_one_line(byte_model, plain_stores, tmp_path, capsys):
    _, kto = plain_stores
    code, err = run_cli(["--model", str(byte_model), "--store", str(kto), "--out", str(tmp_path / "r"), "--loss",
                         "distill", "--max-steps", "1"], capsys)
    assert code == 1
    assert err == [(
        f"Error: --loss distill trains on the teacher records of a preference-pair or completion store; {kto} is an "
        "unpaired store (KTO, BCO: train it with --loss kto, apo_zero_unpaired or bco)")]


def test_check_teacher_resolves_distills_beta_for_the_record_kind():
    distill = Objective(loss_types=("distill",))
    top_k = fake_store(teacher={"kind": "top_k", "k": 8, "vocab": 384})
    sampled = fake_store(teacher={"kind": "sampled", "k": 12, "vocab": 384})
    assert check_teacher(top_k, distill).distill_divergence == 1.0
    assert check_teacher(sampled, distill).distill_divergence == 0.0
    assert check_teacher(fake_store(), Objective()) == Objective()  # no teacher loss: no teacher needed
    with pytest.raises(LogitstoreError) as info:
        check_teacher(sampled, Objective(loss_types=("distill",), distill_beta=1.0))
    assert str(info.value) == ("/data/s.lstore holds sampled teacher records, which estimate only the forward KL; "
                               "pass --distill-beta 0 (got 1.0)")


def test_a_teacher_k_above_the_models_vocabulary_is_one_line():
    distill = Objective(loss_types=("distill",))
    check_teacher_vocabulary(fake_store(teacher={"kind": "top_k", "k": 8, "vocab": 384}), distill, 384)
    with pytest.raises(LogitstoreError) as info:
        check_teacher_vocabulary(fake_store(teacher={"kind": "sampled", "k": 8, "vocab": 32000}), distill, 384)
    assert str(info.value) == ("/data/s.lstore holds a teacher of 32000 tokens, more than the model's vocabulary "
                               "of 384; the store was built for another tokenizer")
