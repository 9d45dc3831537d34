"""Shared fixtures: tiny models made from configs at test time, and small preference data written by the tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One math thread per process (and per CLI subprocess, which inherit it): the models here are tiny, and on a busy
# 2-core machine several OpenMP threads per process spin against each other (measured at load 10: the 24-step
# training test 97 s with torch's default threads, 9 s with one). Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

def _tiny_mistral(folder: Path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    MistralForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def mistral_model(tmp_path_factory) -> Path:
    """A 2-layer Mistral with the real Mistral-7B v0.1 tokenizer (32,000 tokens), shipped by mistral-common."""
    import mistral_common
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("mistral")
    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(source, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder))
    return _tiny_mistral(folder, tokenizer)


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory) -> Path:
    """A 2-layer Mistral with the byte-level ByT5 tokenizer (no files needed)."""
    from logitstore.dpo.demo import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("bytes"))


@pytest.fixture(scope="session")
def kind_stores(byte_model, tmp_path_factory) -> dict[str, Path]:
    """One store of each kind and teacher record, built once by `logitstore build` (in this process) from the byte
    model: pairs with top-k records, unpaired (KTO's KL pairing), completion with top-k and with sampled records.
    Shared by every test that reads them: copy one before changing it."""
    from cli_process import run_cli
    from sample_data import completion_rows, implicit_rows, unpaired_rows, write_jsonl

    folder = tmp_path_factory.mktemp("kinds")
    pairs = write_jsonl(folder / "pairs.jsonl", implicit_rows(8))
    unpaired = write_jsonl(folder / "unpaired.jsonl", unpaired_rows(8))
    completion = write_jsonl(folder / "completion.jsonl", completion_rows(8))
    builds = {"pairs-top-k": (pairs, "--top-k", "8"), "unpaired": (unpaired, "--kl-batch-size", "4"),
              "completion-top-k": (completion, "--top-k", "8"),
              "completion-sampled": (completion, "--sample-k", "8", "--seed", "3")}
    stores = {}
    for name, (data, *extra) in builds.items():
        done = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(folder / name),
                       "--max-length", "128", *extra, "--quiet")
        assert done.returncode == 0, done.stderr
        stores[name] = folder / name
    return stores
