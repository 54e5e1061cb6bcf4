"""Agreement of a judge's P(keep) with human decisions: pure functions on numbers.

The positive class of precision / recall is "reject" (the judge's job is to catch bad images). A
prediction is "keep" when P(keep) >= 0.5. Cohen's kappa corrects accuracy for chance (a judge that keeps
everything on 80% keeps has 0.8 accuracy and kappa 0); it is 0 when chance agreement is total.
Calibration: Brier score (mean squared error of P(keep)) and expected calibration error over 10 bins.
"""

from __future__ import annotations

from typing import Any


def agreement(p_keep: list[float], human_keep: list[bool], *, threshold: float = 0.5, bins: int = 10) -> dict[str, Any]:
    if len(p_keep) != len(human_keep) or not p_keep:
        raise ValueError(f"need one probability per decision, got {len(p_keep)} and {len(human_keep)}")
    n = len(p_keep)
    pred = [p >= threshold for p in p_keep]
    tp = sum(1 for y, h in zip(pred, human_keep) if not y and not h)  # reject predicted and true
    fp = sum(1 for y, h in zip(pred, human_keep) if not y and h)
    fn = sum(1 for y, h in zip(pred, human_keep) if y and not h)
    agree = sum(1 for y, h in zip(pred, human_keep) if y == h)
    accuracy = agree / n
    pk_pred, pk_true = sum(pred) / n, sum(human_keep) / n
    chance = pk_pred * pk_true + (1 - pk_pred) * (1 - pk_true)
    kappa = 0.0 if chance >= 1.0 else (accuracy - chance) / (1 - chance)
    brier = sum((p - float(h)) ** 2 for p, h in zip(p_keep, human_keep)) / n
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [(p, h) for p, h in zip(p_keep, human_keep) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if members:
            conf = sum(p for p, _ in members) / len(members)
            freq = sum(1 for _, h in members if h) / len(members)
            ece += len(members) / n * abs(conf - freq)
    return {
        "n": n, "accuracy": accuracy, "kappa": kappa,
        "reject_precision": tp / (tp + fp) if tp + fp else 0.0,
        "reject_recall": tp / (tp + fn) if tp + fn else 0.0,
        "brier": brier, "ece": ece, "mean_p_keep": sum(p_keep) / n, "human_keep_rate": pk_true,
    }


def beats(candidate: dict[str, Any], incumbent: dict[str, Any]) -> bool:
    """Higher held-out kappa wins; equal kappa (to 1e-9) goes to higher accuracy; a full tie keeps the incumbent."""
    if abs(candidate["kappa"] - incumbent["kappa"]) > 1e-9:
        return candidate["kappa"] > incumbent["kappa"]
    return candidate["accuracy"] > incumbent["accuracy"] + 1e-9
