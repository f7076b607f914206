"""The record of one `prad train` run as files next to its adapter: training_log.json (the loss of every
step and each dev evaluation) and training.png (loss and dev score against steps).

The plot needs matplotlib (a dev dependency); without it only the JSON is written, and a note says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

LOG_FILE = "training_log.json"
PLOT_FILE = "training.png"


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start), so a noisy loss curve shows its trend."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_training_record(folder: Path, task: str, primary: str, losses: list[float],
                          history: list[dict[str, Any]]) -> list[Path]:
    """training_log.json, and training.png when matplotlib is there, in `folder`; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / LOG_FILE
    log_path.write_text(json.dumps({"task": task, "primary_score": primary, "losses": [round(x, 5) for x in losses],
                                    "history": history}, indent=1) + "\n")
    try:
        import matplotlib
    except ImportError:
        print(f"prad train: matplotlib is not installed, no {PLOT_FILE} (the log is in {log_path})", file=sys.stderr)
        return [log_path]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = list(range(1, len(losses) + 1))
    left.plot(steps, losses, color="lightgrey", linewidth=0.8, label="train loss (per step)")
    left.plot(steps, smoothed(losses, max(1, len(losses) // 20)), color="C0", label="train loss (smoothed)")
    evaluated = [h for h in history if "loss" in h]
    if evaluated:
        left.plot([h["step"] for h in evaluated], [h["loss"] for h in evaluated], "o-", color="C1", label="dev loss")
        right.plot([h["step"] for h in evaluated], [h["scores"][primary] for h in evaluated], "o-", color="C2")
    left.set(xlabel="step", ylabel="cross-entropy per target token", title=f"{task}: loss")
    right.set(xlabel="step", ylabel=f"dev {primary}", title=f"{task}: dev {primary}")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    plot_path = folder / PLOT_FILE
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
    return [log_path, plot_path]
