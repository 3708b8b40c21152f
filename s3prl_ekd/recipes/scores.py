"""Test scores read from the prediction files s3prl's experts write, per utterance, and their
uncertainty: a bootstrap over test utterances, and a paired bootstrap between two upstreams.

Every metric is a ratio of sums over utterances: errors / reference length for PER and WER,
correct / 1 for accuracies. Keeping the per-utterance (numerator, denominator) pairs lets the
bootstrap resample utterances and recompute the metric exactly as s3prl does. With several runs of one
upstream (training seeds), the bootstrap resamples runs and utterances together, and paired verdicts
over many comparisons are corrected with Holm's method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s3prl_ekd.errors import UserError

Scores = dict[str, tuple[float, float]]  # utterance -> (numerator, denominator)


@dataclass(frozen=True)
class ScoreFiles:
    """Which files of the experiment folder hold one task's test predictions and references."""

    hypothesis: str  # may contain {split} and {fold}
    reference: str
    kind: str        # "error_rate" (tokens split on spaces) or "accuracy"


SCORE_FILES = {
    "pr": ScoreFiles("{split}-hyp.ark", "{split}-ref.ark", "error_rate"),
    "sid": ScoreFiles("{split}_predict.txt", "{split}_truth.txt", "accuracy"),
    "er": ScoreFiles("{split}_{fold}_predict.txt", "{split}_{fold}_truth.txt", "accuracy"),
    "asr": ScoreFiles("{split}-noLM-hyp.ark", "{split}-noLM-ref.ark", "error_rate"),
}


def read_ark(path: Path) -> dict[str, str]:
    """`UTTERANCE rest of line` per line -> {utterance: rest}."""
    if not path.is_file():
        raise UserError(f"{path}: s3prl wrote no prediction file here; see the task's test.log")
    return dict((line.split(" ", 1) + [""])[:2] for line in path.read_text().splitlines() if line.strip())


def utterance_scores(task: str, expdir: Path, split: str, fold: str | None = None) -> Scores:
    """Per test utterance, (errors, reference tokens) for PR/ASR or (correct, 1) for SID/ER."""
    import editdistance

    files = SCORE_FILES[task]
    hypotheses = read_ark(expdir / files.hypothesis.format(split=split, fold=fold))
    references = read_ark(expdir / files.reference.format(split=split, fold=fold))
    missing = sorted(set(references) - set(hypotheses))
    if missing:
        raise UserError(f"{expdir}: no prediction for {len(missing)} test utterance(s), e.g. {missing[0]}")
    if files.kind == "accuracy":
        return {utt: (float(hypotheses[utt] == ref), 1.0) for utt, ref in references.items()}
    return {utt: (float(editdistance.eval(hypotheses[utt].split(), ref.split())), float(len(ref.split())))
            for utt, ref in references.items()}


def percent(scores: Scores) -> float:
    numerator = sum(n for n, _ in scores.values())
    denominator = sum(d for _, d in scores.values())
    return 100.0 * numerator / max(denominator, 1e-12)


def _arrays(runs: list[Scores], utterances: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(numerators, denominators), each (runs, utterances)."""
    return (np.array([[scores[u][0] for u in utterances] for scores in runs]),
            np.array([[scores[u][1] for u in utterances] for scores in runs]))


def _common_utterances(runs: list[Scores]) -> list[str]:
    utterances = sorted(runs[0])
    if any(sorted(scores) != utterances for scores in runs):
        raise UserError("bootstrap: the runs were scored on different test utterances")
    return utterances


def _resampled_means(num: np.ndarray, den: np.ndarray, runs: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """For each resample b: the mean over its drawn runs `runs[b]` of the metric on its drawn utterances
    `picks[b]`. num, den (R, U); runs (B, R') indices; picks (B, U) indices -> (B,)."""
    out = np.empty(len(picks))
    for start in range(0, len(picks), 500):  # (R, 500, U) at a time
        rows = picks[start:start + 500]
        metric = 100.0 * num[:, rows].sum(-1) / np.maximum(den[:, rows].sum(-1), 1e-12)  # (R, b)
        out[start:start + 500] = np.take_along_axis(metric.T, runs[start:start + 500], axis=1).mean(axis=1)
    return out


def _draws(runs: int, utterances: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs (seeds) and utterances drawn with replacement, independently, per resample."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, utterances, (samples, utterances))
    chosen = rng.integers(0, runs, (samples, runs)) if runs > 1 else np.zeros((samples, 1), dtype=int)
    return chosen, picks


def mean_percent(runs: list[Scores]) -> float:
    """The metric averaged over runs (seeds), each computed over its own utterances as s3prl does."""
    return float(np.mean([percent(scores) for scores in runs]))


def bootstrap_interval(runs: Scores | list[Scores], samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `mean_percent(runs)`, resampling the runs (training seeds) and the
    test utterances together: an interval that holds the seed-to-seed spread as well as the test set's."""
    runs = [runs] if isinstance(runs, dict) else list(runs)
    utterances = _common_utterances(runs)
    num, den = _arrays(runs, utterances)
    chosen, picks = _draws(len(runs), len(utterances), samples, seed)
    values = _resampled_means(num, den, chosen, picks)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Paired:
    """`a` against `b` on one task: the difference of their metrics (mean over paired runs), its
    bootstrap interval and a two-sided bootstrap p-value for "no difference"."""

    difference: float
    low: float
    high: float
    p_value: float


def paired_difference(a: Scores | list[Scores], b: Scores | list[Scores], samples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Paired:
    """metric(a) - metric(b), resampling utterances and run pairs together: run i of `a` is paired with
    run i of `b` (the same training and downstream seed), the same utterances are drawn for both."""
    a = [a] if isinstance(a, dict) else list(a)
    b = [b] if isinstance(b, dict) else list(b)
    if len(a) != len(b):
        raise UserError(f"paired bootstrap: {len(a)} runs against {len(b)}; pair runs of the same seeds")
    utterances = _common_utterances(a + b)
    num_a, den_a = _arrays(a, utterances)
    num_b, den_b = _arrays(b, utterances)
    chosen, picks = _draws(len(a), len(utterances), samples, seed)
    diff = _resampled_means(num_a, den_a, chosen, picks) - _resampled_means(num_b, den_b, chosen, picks)
    low, high = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    # Two-sided: twice the smaller tail beyond 0, counting the observed sample (never exactly 0).
    tail = min((diff <= 0).sum(), (diff >= 0).sum())
    p_value = min(1.0, 2 * (tail + 1) / (len(diff) + 1))
    return Paired(mean_percent(a) - mean_percent(b), float(low), float(high), float(p_value))


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which of the hypotheses are rejected with a family-wise error of `alpha`.

    The k-th smallest p-value (k = 0, 1, ...) is compared with alpha / (m - k); rejection stops at the
    first that fails.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, index in enumerate(order):
        if p_values[index] > alpha / (len(p_values) - rank):
            break
        rejected[index] = True
    return rejected
