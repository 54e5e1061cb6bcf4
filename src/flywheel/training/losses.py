"""The run's loss curve: ``loss.csv`` (step, loss, lr, epoch) and ``loss.png`` beside it."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)

FIELDS = ["step", "loss", "lr", "epoch"]


def save_csv(losses: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(losses)
    return path


def plot(losses: list[dict], path: Path, *, title: str = "") -> Path | None:
    """Per-step loss (flow matching's is noisy: each step draws its own t) with a moving average over it,
    and the learning rate on a second axis. Returns None, with a warning, when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("loss curve: matplotlib is not installed, so only %s is written (pip install matplotlib)",
                    path.with_suffix(".csv").name)
        return None
    steps = [r["step"] for r in losses]
    values = [r["loss"] for r in losses]
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    fig = Figure(figsize=(8, 4.5), dpi=100)  # no pyplot: no global backend or figure state in a library
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in losses], color="tab:orange", linewidth=1.0, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
