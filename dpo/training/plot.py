"""A PNG of the training curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: str | Path, png: str | Path, panels: list[tuple[str, str]]) -> Path:
    """One panel per (metric, title) of `panels` (the store kind's task says which), train and eval curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(13 * len(panels) / 3, 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot(steps, [r[key] for r in rows], marker="o", ms=3, label="train")
        eval_key = "eval/loss" if key == "loss" else "eval/" + key.replace("/", "_")
        ev = [(r["step"], r[eval_key]) for r in rows if eval_key in r]
        if ev:
            ax.plot(*zip(*ev), marker="s", ms=4, label="eval")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
