"""A user sees their margin: each logged step's peak memory in metrics.jsonl, the run's peak in the final line, and
running out of memory on a step as one line naming the peak and what lowers it (dpo/training/memory.py)."""

from __future__ import annotations

import json

import pytest
import torch

from logitstore.dpo.training import memory
from logitstore.dpo.reference import BuildConfig, build
from logitstore.dpo.training import TrainConfig, train

from sample_data import implicit_rows, write_jsonl

REMEDY = ("lower it with --mlp-chunk 256 (+2% step time at 512 tokens), --split-sequences (+21% step time at 512 "
          "tokens), --gradient-checkpointing (one more forward of the layers) (cheapest in step time first); or a "
          "smaller --batch-size (--grad-accum keeps the effective batch) or a store built with a shorter --max-length")


@pytest.fixture(scope="module")
def store(byte_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    data = write_jsonl(folder / "d.jsonl", implicit_rows(16))
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(folder / "s"), max_length=256), progress=False)
    return folder / "s"


def cpu_allocator_failure() -> RuntimeError:
    """What the CPU allocator really raises when the system refuses memory."""
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("2**62 bytes were allocated")


def test_out_of_memory_errors_are_recognised():
    assert memory.is_out_of_memory(cpu_allocator_failure())
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."))
    assert not memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not memory.is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))


def test_the_message_names_the_step_the_peak_and_the_remedies(monkeypatch):
    meter = memory.PeakMeter()
    meter.start("cpu")
    meter.step = 3
    monkeypatch.setattr(memory, "process_peak_rss", lambda: 3 * memory.GIB // 2)
    error = meter.out_of_memory(cpu_allocator_failure())
    assert isinstance(error, memory.OutOfMemoryError) and isinstance(error, MemoryError)
    assert str(error) == ("out of memory at step 3 (one more allocation of 4294967296.00 GiB): peak memory 1.50 GiB "
                          f"(CPU, peak RSS); {REMEDY}")
    meter.step = None
    assert str(meter.out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))) == (
        f"out of memory before the first step: peak memory 1.50 GiB (CPU, peak RSS); {REMEDY}")


def test_each_logged_step_records_its_peak(byte_model, store, tmp_path):
    result = train(TrainConfig(model=str(byte_model), store=str(store), out=str(tmp_path / "run"), max_steps=3,
                               batch_size=4, log_every=1, plot=False), progress=False, log=lambda s: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["peak_memory_kind"] for x in lines] == ["CPU, peak RSS"] * 3
    peaks = [x["peak_memory_gib"] for x in lines]
    assert peaks == sorted(peaks) and 0.05 < peaks[0] < 64  # the process's peak so far: never falls
    assert result["peak_memory_gib"] >= peaks[-1]
    assert result["peak_memory"] == f"peak memory {result['peak_memory_gib']:.2f} GiB (CPU, peak RSS)"


def test_out_of_memory_on_a_step_is_one_line(byte_model, store, tmp_path, monkeypatch, capsys):
    """The allocator failing in step 2's forward pass: one line on stderr, exit 1, no traceback."""
    from logitstore.cli.main import main
    from logitstore.dpo.kinds.pairs import PairsTask

    real, calls = PairsTask.step, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            torch.empty(2**62, dtype=torch.uint8)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PairsTask, "step", failing)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", str(byte_model), "--store", str(store), "--out", str(tmp_path / "run"),
              "--max-steps", "3", "--batch-size", "4", "--quiet"])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line, = captured.err.splitlines()
    head, rest = line.split(": peak memory ")
    assert head == "Error: out of memory at step 2 (one more allocation of 4294967296.00 GiB)"
    gib, tail = rest.split(" GiB ", 1)
    assert float(gib) > 0.05 and tail == f"(CPU, peak RSS); {REMEDY}"
    # The step logged before it is intact.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1]


def test_dropout_is_off_by_default_as_in_trl(byte_model, store):
    """TRL's DPOTrainer sets p = 0 in every dropout module (disable_dropout=True); so does training here, unless
    --keep-dropout: then LoRA's dropout runs, and the forward keeps a dropped copy and a mask for each adapted
    layer's input."""
    from logitstore.dpo.training.policy import setup_policy

    saved: dict[bool, set[int]] = {}
    for disable in (True, False):
        cfg = TrainConfig(model=str(byte_model), store=str(store), out="unused", lora_dropout=0.1,
                          disable_dropout=disable)
        model = setup_policy(cfg).train()
        rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert rates == ({0.0} if disable else {0.1})
        saved[disable] = set()

        def pack(t: torch.Tensor, into=saved[disable]) -> torch.Tensor:
            into.add(t.untyped_storage().data_ptr())
            return t

        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 200, (2, 16))).logits.sum().backward()
        adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert adapted > 0 and len(saved[False]) >= len(saved[True]) + adapted


def test_the_remedies_leave_out_what_the_run_uses_and_name_offloading_on_a_gpu():
    assert memory.remedies(gpu=True, in_use=frozenset({"--gradient-checkpointing", "--split-sequences"})) == (
        "lower it with --mlp-chunk 256 (+2% step time at 512 tokens), --offload-activations (the copies to CPU "
        "memory and back) "
        "(cheapest in step time first); or a smaller --batch-size (--grad-accum keeps the effective batch) or a "
        "store built with a shorter --max-length")
    every = frozenset({"--gradient-checkpointing", "--mlp-chunk", "--split-sequences"})
    assert memory.remedies(gpu=False, in_use=every) == (
        "lower it with a smaller --batch-size (--grad-accum keeps the effective batch) or a store built with a "
        "shorter --max-length")


def test_out_of_memory_with_every_cpu_option_names_what_is_left(byte_model, store, tmp_path, monkeypatch, capsys):
    from logitstore.cli.main import main
    from logitstore.dpo.kinds.pairs import PairsTask

    def failing(self, *args, **kwargs):
        torch.empty(2**62, dtype=torch.uint8)

    monkeypatch.setattr(PairsTask, "step", failing)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", str(byte_model), "--store", str(store), "--out", str(tmp_path / "run"),
              "--max-steps", "1", "--batch-size", "4", "--gradient-checkpointing", "--split-sequences",
              "--mlp-chunk", "64", "--quiet"])
    assert exit_.value.code == 1
    line, = capsys.readouterr().err.splitlines()
    assert line.endswith("(CPU, peak RSS); lower it with a smaller --batch-size (--grad-accum keeps the effective "
                         "batch) or a store built with a shorter --max-length")
