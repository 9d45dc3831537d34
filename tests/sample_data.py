"""Small preference data the tests write themselves (the suite runs from a plain clone without shared data)."""

from __future__ import annotations

import json
from pathlib import Path

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


def unpaired_rows(n: int) -> list[dict]:
    """Thumbs up / thumbs down: each question with its good answer (True) or its bad one (False), in turn."""
    rows = []
    for i in range(n):
        question, good, bad = HUMAN_TURNS[i % len(HUMAN_TURNS)]
        label = i % 3 != 1
        rows.append({"id": f"u{i}", "prompt": f"Human: {question} (#{i})\n\nAssistant:",
                     "completion": " " + (good if label else bad) * (1 + i % 2), "label": label})
    return rows


def completion_rows(n: int) -> list[dict]:
    """Prompt/completion data (TRL's prompt-completion format): each question with one of its answers."""
    return [{"id": f"c{i}", "prompt": f"Human: {HUMAN_TURNS[i % len(HUMAN_TURNS)][0]} (#{i})\n\nAssistant:",
             "completion": " " + HUMAN_TURNS[i % len(HUMAN_TURNS)][1 + i % 2]} for i in range(n)]
