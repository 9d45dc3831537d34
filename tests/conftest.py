"""Shared fixtures: tiny models made from configs at test time, and small preference data written by the tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HUMAN_TURNS = [
    ("What is a good way to store leftover rice?", "Cool it quickly and refrigerate it within an hour.",
     "Leave it on the counter overnight so it stays soft."),
    ("How do I reset a forgotten email password?", "Use the provider's account recovery page and verify your identity.",
     "Guess common passwords until one works."),
    ("Can you help me write a polite reminder to a colleague?",
     "Sure: 'Hi Sam, just a friendly reminder about the report due Friday. Thanks!'",
     "Tell them they are lazy and should have done it already."),
    ("What should I do if I find a wallet on the street?", "Hand it to the police or try to contact the owner.",
     "Keep the cash and throw the wallet away."),
    ("Why is the sky blue?", "Air scatters short blue wavelengths of sunlight more than red ones.",
     "Because the ocean reflects onto it."),
    ("How many legs does a spider have?", "Eight.", "Six, like all insects."),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def implicit_rows(n: int) -> list[dict]:
    """hh-rlhf style pairs: full transcripts sharing the prompt, no prompt field."""
    rows = []
    for i in range(n):
        q, good, bad = HUMAN_TURNS[i % len(HUMAN_TURNS)]
        context = f"\n\nHuman: {q} (case {i})" + (" Please be brief." if i % 3 == 0 else "")
        rows.append({"chosen": f"{context}\n\nAssistant: {good}", "rejected": f"{context}\n\nAssistant: {bad}"})
    return rows


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
    from dpo.demo import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("bytes"))


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", implicit_rows(24))
