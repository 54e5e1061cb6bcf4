"""Agreement of a judge's P(keep) with human decisions: pure functions on numbers.

The positive class of precision / recall is "reject" (the judge's job is to catch bad images). A
prediction is "keep" when P(keep) >= 0.5. Cohen's kappa corrects accuracy for chance (a judge that keeps
everything on 80% keeps has 0.8 accuracy and kappa 0); it is 0 when chance agreement is total.
Calibration: Brier score (mean squared error of P(keep)) and expected calibration error over 10 bins.

Promotion asks whether a kappa gain is more than luck: ``kappa_gain_interval`` is the paired bootstrap of
``flywheel.evaluation.stats`` applied to kappa, resampling held-out groups (a source's edits are not
independent of each other) and computing both judges' kappa on the same resampled decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.evaluation.stats import Comparison

RESAMPLES = 2000
CONFIDENCE = 0.95


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


def kappa_gain_interval(candidate: list[float], incumbent: list[float], human_keep: list[bool], groups: list[str], *,
                        threshold: float = 0.5, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                        seed: int = 0) -> Comparison:
    """Bootstrap interval of kappa(candidate) - kappa(incumbent) on the same decisions, resampling groups.

    Each resample draws as many groups as there are, with replacement, and pools their decisions; both
    judges are scored on that same pool (paired). With a single group the decisions themselves are
    resampled. The returned ``Comparison`` (baseline: incumbent kappa) has ``verdict == "better"`` only
    when the whole interval is above zero.
    """
    import numpy as np

    from flywheel.evaluation.stats import Comparison

    if not (len(candidate) == len(incumbent) == len(human_keep) == len(groups)) or not groups:
        raise ValueError("need one candidate, incumbent, decision and group per held-out example")
    keys = groups if len(set(groups)) > 1 else [str(i) for i in range(len(groups))]  # one group: its decisions
    units = sorted(set(keys))
    index = {u: i for i, u in enumerate(units)}
    unit_of = [index[k] for k in keys]
    h = np.array(human_keep, dtype=bool)

    def per_unit(p: list[float]) -> np.ndarray:
        """(units x 4): decisions, agreements, predicted keeps, human keeps."""
        pred = np.array(p) >= threshold
        out = np.zeros((len(units), 4))
        np.add.at(out, unit_of, np.stack([np.ones(len(h)), pred == h, pred, h], axis=1))
        return out

    def kappa(totals: np.ndarray) -> np.ndarray:
        n = totals[..., 0]
        po, pk_pred, pk_true = totals[..., 1] / n, totals[..., 2] / n, totals[..., 3] / n
        chance = pk_pred * pk_true + (1 - pk_pred) * (1 - pk_true)
        return np.where(chance < 1.0, (po - chance) / np.where(chance < 1.0, 1 - chance, 1.0), 0.0)

    cand, inc = per_unit(candidate), per_unit(incumbent)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(units), size=(resamples, len(units)))
    weights = np.zeros((resamples, len(units)))
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    gains = kappa(weights @ cand) - kappa(weights @ inc)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(gains, [alpha, 1 - alpha])
    k_cand, k_inc = float(kappa(cand.sum(axis=0))), float(kappa(inc.sum(axis=0)))
    return Comparison(k_inc, k_cand, k_cand - k_inc, float(low), float(high), len(units))
