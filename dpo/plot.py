"""A PNG of the training curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: str | Path, png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    panels = [("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    if rows and "distill/loss" in rows[0]:  # distillation: its term next to the total
        panels = [("loss", "loss"), ("distill/loss", "distillation term (per token)"), ("rewards/margins",
                                                                                      "reward margin")]
    if rows and "rewards/accuracies" not in rows[0] and "kl" in rows[0]:  # an unpaired loss: no pairs to rank
        panels = [("loss", "loss"), ("kl", "KL estimate (KTO's z0)"), ("rewards/chosen", "desirable reward")]
    if rows and "rewards/accuracies" not in rows[0] and "kl" not in rows[0]:  # distill on a completion store
        panels = [("loss", "distillation loss (per token)"), ("logps", "completion log-prob")]
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
