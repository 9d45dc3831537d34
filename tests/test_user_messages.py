"""The lines a TRL user reads at the edges, pinned: unknown losses, weight counts in the flags' words, where a
malformed JSON line breaks, build --quiet's one line, paths as a person writes them, DDP without deprecation
warnings, one refusal line under torchrun, and what the demo model's top-k records hold."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.storage import tidy_path

from ports import free_port
from sample_data import implicit_rows, write_jsonl
from test_cli_edges import run_main


def test_an_unknown_loss_lists_every_choice_the_option_takes(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--model", "m", "--store", "s", "--out", str(tmp_path / "r"),
                            "--loss", "ktoo")
    assert code == 2
    assert err.splitlines()[-1] == (
        "Error: Invalid value for '--loss': unknown loss type 'ktoo'; choose from sigmoid, hinge, ipo, exo_pair, "
        "nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, "
        "distill, tdpo1, tdpo2 (a preference-pair store) or kto, apo_zero_unpaired, bco (an unpaired store)")


def test_a_weight_count_mismatch_speaks_of_the_flags(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--model", "m", "--store", "s", "--out", str(tmp_path / "r"),
                            "--loss", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2")
    assert code == 2
    assert err.splitlines()[-1] == ("Error: --loss-weights gives 2 weights for 3 --loss types (sigmoid, bco_pair, "
                                    "sft); give one weight per type, in the same order")


def test_a_malformed_json_line_names_the_column_where_it_breaks(byte_model, capsys, tmp_path):
    line = '{"prompt": "p", "chosen": "a", "rejected": "b"'  # 46 characters, the closing brace missing
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    code, out, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(tmp_path / "bad.jsonl"),
                              "--out", str(tmp_path / "s"), "--quiet")
    assert (code, out) == (1, "")
    assert err == (f"Error: {tmp_path / 'bad.jsonl'}:2: malformed JSON (Expecting ',' delimiter at column 47, the end "
                   "of the line)\n")
    assert not (tmp_path / "s").exists()


def test_build_quiet_prints_one_line_with_the_digest(byte_model, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(4))
    code, out, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                              str(tmp_path / "s"), "--max-length", "128", "--quiet")
    assert (code, err) == (0, "")
    [line] = out.splitlines()
    assert line.startswith(f"Built {tmp_path / 's'}: 4 pairs (4 computed, 0 reused), 1 shard written, ")
    assert line.endswith(f" per pair). Store digest: {logitstore.open(tmp_path / 's').digest}")


def test_messages_show_paths_without_dot_dot(byte_model, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    code, _, err = run_main(capsys, "verify", "work/../repo/pairs.lstore")
    assert (code, err) == (1, f"Error: no logitstore store at {tmp_path / 'repo' / 'pairs.lstore'}\n")
    code, _, err = run_main(capsys, "build", "--model", str(byte_model), "--data", "work/../data/pairs.jsonl", "--out",
                            "s")
    assert (code, err.splitlines()[-1]) == (1, "Error: data/pairs.jsonl: no such file or folder")


def test_a_dot_dot_after_a_symbolic_link_is_kept(tmp_path):
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    # the system resolves link/.. to elsewhere/, not to tmp_path: the lexical tidy-up would name another folder
    assert tidy_path(tmp_path / "link" / ".." / "s") == tmp_path / "link" / ".." / "s"
    assert tidy_path(tmp_path / "a" / ".." / "s") == tmp_path / "s"
    assert tidy_path("work/./../x.jsonl") == Path("x.jsonl")


def test_ddp_is_made_without_the_broadcast_buffers_deprecation(byte_model):
    import torch
    import torch.distributed as dist

    from logitstore.dpo.distributed import policy as distributed
    from logitstore.dpo.model.loading import load_model

    model = load_model(str(byte_model), dtype="float32", device="cpu")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped = distributed.wrap_policy(model, lora=True, dtype="float32", device=torch.device("cpu"))
        assert wrapped._logitstore_engine == "ddp" and wrapped.forward_sync_buffers is False
        assert [str(w.message) for w in caught if "broadcast_buffers" in str(w.message)] == []
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # torchrun
def test_a_refusal_under_torchrun_is_printed_once_and_named_in_torchruns_report(byte_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(4))
    script = Path(sys.executable).parent / "logitstore"
    done = subprocess.run([str(script), "build", "--model", str(byte_model), "--data", str(data), "--out",
                           str(tmp_path / "s"), "--max-length", "128", "--quiet"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "--no-python", str(script), "train", "--model", str(byte_model), "--store",
                          str(tmp_path / "s"), "--out", str(tmp_path / "run"), "--resume"],
                         capture_output=True, text=True, timeout=300, env=env)
    line = f"Error: --resume: no checkpoint in {tmp_path / 'run'}"
    assert run.returncode != 0 and run.stdout == ""
    assert run.stderr.splitlines().count(line) == 1  # rank 0's line, printed before torchrun's report
    assert f"traceback : {line}" in run.stderr  # torchrun's report names it (not a link to its docs)
    assert "FutureWarning" not in run.stderr


def test_the_demo_models_top_k_records_are_near_uniform_and_the_sqrt_codec_gives_them_one_level(byte_model,
                                                                                                tmp_path, capsys):
    """The demo model (random weights) is near-uniform: its 8 most likely next tokens hold about 0.03 of the mass,
    each log-prob within (-5.7, -5.3) nats (uniform over its 384 tokens: -5.95). The sqrt codec keeps sqrt(p) in
    steps of 2^-6, and every sqrt(p) in [3.5/64, 4.5/64) decodes to 4/64: log(1/256) = -5.545 for every entry, within
    the codec's bound. docs/teacher.md ("Codec") says so."""
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(6))
    records = {}
    for codec in ("sqrt", "exact"):
        out = tmp_path / f"{codec}.lstore"
        assert run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out", str(out),
                        "--max-length", "256", "--top-k", "8", "--topk-codec", codec, "--quiet")[0] == 0
        records[codec] = np.concatenate(logitstore.open(out).top_k("chosen", range(6))["logps"])
    exact, sqrt = records["exact"], records["sqrt"]
    assert exact.shape == sqrt.shape and exact.shape[1] == 8
    assert -5.7 < exact.min() and exact.max() < -5.3 and exact.max() - exact.min() > 0.2
    assert np.log(1 / 384) < exact.min()
    assert np.unique(sqrt).tolist() == [np.float32(2 * np.log(4 / 64))] and round(float(sqrt[0, 0]), 3) == -5.545
    assert (np.abs(np.sqrt(np.exp(exact.astype(np.float64))) - 4 / 64) <= 2.0 ** -7).all()  # within the codec's bound
