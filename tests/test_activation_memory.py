"""The activation-memory options of `logitstore train` (issue 26): --split-sequences, --mlp-chunk N and
--offload-activations. Each changes what the backward pass holds, never what it computes: the loss and the LoRA
gradients of one batch equal the default path's, for every store kind and every loss, with and without gradient
checkpointing; what cannot run is refused in one line.

Tolerance of the gradient comparisons: scoring a row alone (or the MLP over a chunk of positions) changes only the
shapes of float32 matmuls, hence the order their sums are rounded in (machine epsilon 1.2e-7, a few hundred terms
per dot product, two layers). Rounding errors scale with the summands, not with the one element they land in, so
each gradient tensor is compared as a whole: its largest difference against 1e-5 of its largest entry (measured:
about 1e-6 of it for IPO, whose squared loss amplifies most; 1e-6 for sigmoid). Any real change of the gradient (a
row left out, a side weighted twice) is O(1) of it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_process import run_cli

SCALE = 1e-5


def assert_same_gradients(grads: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == base.keys()
    assert any(float(g.abs().max()) > 0 for g in base.values())
    for name, g in base.items():
        difference, largest = float((grads[name] - g).abs().max()), float(g.abs().max())
        assert difference <= SCALE * largest, f"{name}: differs by {difference:.3g}, largest entry {largest:.3g}"


def lora_step(model, store, tmp_path, **options) -> tuple[float, dict[str, torch.Tensor]]:
    """One batch's loss and the LoRA parameters' gradients, through the loop's own preparation and task."""
    from logitstore.dpo.config import TrainConfig
    from logitstore.dpo.training import loop

    cfg = TrainConfig(model=str(model), store=str(store), out=str(tmp_path / "run"), batch_size=4, lora_r=4,
                      plot=False, **options)
    run = loop.prepare(cfg)
    t = loop.load_trainee(run)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero; a non-zero one makes every gradient (A's too) non-trivial
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    loader, _ = run.task.loader(cfg.store, rank=0, world=1, device=t.device)
    batch = next(iter(loader))
    loss, _ = run.task.step(t.policy, batch, t.device)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def per_token_store(byte_model, tmp_path_factory):
    from sample_data import implicit_rows, write_jsonl

    folder = tmp_path_factory.mktemp("per-token")
    data = write_jsonl(folder / "pairs.jsonl", implicit_rows(8))
    done = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(folder / "s"),
                   "--max-length", "128", "--per-token", "--quiet")
    assert done.returncode == 0, done.stderr
    return folder / "s"


CASES = {
    "pairs-sigmoid": ("pairs-top-k", {}),
    "pairs-ipo": ("pairs-top-k", {"loss": "ipo"}),
    "pairs-sft": ("pairs-top-k", {"loss": "sigmoid,sft"}),
    "pairs-wpo": ("pairs-top-k", {"use_weighting": True}),
    "pairs-distill": ("pairs-top-k", {"loss": "distill"}),
    "pairs-tdpo2": ("pairs-top-k", {"loss": "tdpo2"}),
    "pairs-ld-dpo": ("per-token", {"ld_alpha": 0.5}),
    "unpaired-kto": ("unpaired", {"loss": "kto"}),
    "completion-distill": ("completion-top-k", {"loss": "distill"}),
    "completion-sampled": ("completion-sampled", {"loss": "distill"}),
}


@pytest.mark.parametrize("option", [{"split_sequences": True}, {"mlp_chunk": 8}], ids=["split", "mlp-chunk"])
@pytest.mark.parametrize("case", list(CASES))
def test_option_keeps_loss_and_gradients(byte_model, kind_stores, per_token_store, tmp_path, case, option):
    store_name, loss_options = CASES[case]
    store = per_token_store if store_name == "per-token" else kind_stores[store_name]
    base_loss, base = lora_step(byte_model, store, tmp_path / "a", **loss_options)
    loss, grads = lora_step(byte_model, store, tmp_path / "b", **loss_options, **option)
    assert loss == pytest.approx(base_loss, rel=1e-6, abs=1e-7)
    assert_same_gradients(grads, base)


def test_all_options_with_gradient_checkpointing_keep_gradients(byte_model, kind_stores, tmp_path):
    store = kind_stores["pairs-top-k"]
    base_loss, base = lora_step(byte_model, store, tmp_path / "a")
    loss, grads = lora_step(byte_model, store, tmp_path / "b", gradient_checkpointing=True, split_sequences=True,
                            mlp_chunk=8)
    assert loss == pytest.approx(base_loss, rel=1e-6, abs=1e-7)
    assert_same_gradients(grads, base)


def test_train_cli_with_every_cpu_option_starts_at_ln2(byte_model, kind_stores, tmp_path):
    """The user's path: the step-0 loss of a fresh adapter (policy = reference) is ln 2 within 1e-5 in float32."""
    done = run_cli("train", "--model", str(byte_model), "--store", str(kind_stores["pairs-top-k"]), "--out",
                   str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--log-every", "1",
                   "--gradient-checkpointing", "--split-sequences", "--mlp-chunk", "16", "--quiet")
    assert done.returncode == 0, done.stderr
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-5


def test_offload_activations_is_refused_on_cpu(byte_model, kind_stores, tmp_path):
    done = run_cli("train", "--model", str(byte_model), "--store", str(kind_stores["pairs-top-k"]), "--out",
                   str(tmp_path / "run"), "--device", "cpu", "--offload-activations")
    assert done.returncode == 1
    assert done.stderr.strip() == ("Error: --offload-activations moves what the backward pass keeps from the GPU to "
                                   "CPU memory; this run trains on the CPU, where it means nothing: drop it")
    assert not (tmp_path / "run").exists()


def test_mlp_chunk_must_be_positive(byte_model, kind_stores, tmp_path):
    done = run_cli("train", "--model", str(byte_model), "--store", str(kind_stores["pairs-top-k"]), "--out",
                   str(tmp_path / "run"), "--mlp-chunk", "0")
    assert done.returncode == 2
    assert "Invalid value for '--mlp-chunk': 0 is not in the range x>=1." in done.stderr


@pytest.mark.parametrize("option, flag", [({"split_sequences": True}, "--split-sequences"),
                                          ({"mlp_chunk": 64}, "--mlp-chunk"),
                                          ({"offload_activations": True}, "--offload-activations")])
def test_distributed_runs_refuse_the_options(option, flag):
    from logitstore.dpo.config import TrainConfig
    from logitstore.dpo.training.checks import check_memory_options
    from logitstore.errors import LogitstoreError

    cfg = TrainConfig(model="m", store="s", out="o", **option)
    with pytest.raises(LogitstoreError) as error:
        check_memory_options(cfg, 2, "cuda")
    assert str(error.value) == f"{flag} runs in one process; a distributed run (DDP or FSDP2) trains without it"
    check_memory_options(cfg, 1, "cuda:0")  # one process on a GPU: every option runs


def test_chunked_mlp_refuses_a_model_without_mlps():
    from logitstore.dpo.model.mlp_chunks import chunk_mlps
    from logitstore.errors import LogitstoreError

    with pytest.raises(LogitstoreError, match=r"^--mlp-chunk: Linear has no MLP modules named 'mlp' to chunk; "
                                              r"train without --mlp-chunk$"):
        chunk_mlps(torch.nn.Linear(2, 2), 4)


def test_train_help_says_what_each_option_costs():
    done = run_cli("train", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for piece in ("--split-sequences Memory for step time:",
                  "+21% step time at 512 tokens; peak 2.52 GiB instead of 3.85 GiB at 2,048 tokens (1.97 GiB with "
                  "--mlp-chunk 256).", "--mlp-chunk N Memory for step time:",
                  "Measured as --split-sequences: +2% step time at 512 tokens; peak 3.76 GiB instead of 3.85 GiB at "
                  "2,048 tokens.", "--offload-activations GPU only:", "Refused on the CPU."):
        assert piece in text, piece
