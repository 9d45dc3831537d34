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
