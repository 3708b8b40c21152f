"""Test scores read from the prediction files s3prl's experts write, per utterance, and their
uncertainty: a bootstrap over test utterances, and a paired bootstrap between two upstreams.

Every metric is a ratio of sums over utterances: errors / reference length for PER and WER,
correct / 1 for accuracies. Keeping the per-utterance (numerator, denominator) pairs lets the
bootstrap resample utterances and recompute the metric exactly as s3prl does.
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


def _arrays(scores: Scores, utterances: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([scores[u][0] for u in utterances]), np.array([scores[u][1] for u in utterances]))


def bootstrap_interval(scores: Scores, samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `percent(scores)`, resampling test utterances."""
    utterances = sorted(scores)
    num, den = _arrays(scores, utterances)
    picks = np.random.default_rng(seed).integers(0, len(utterances), (samples, len(utterances)))
    values = 100.0 * num[picks].sum(1) / np.maximum(den[picks].sum(1), 1e-12)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_difference(a: Scores, b: Scores, samples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """metric(a) - metric(b) and its paired-bootstrap interval over the utterances both scored."""
    utterances = sorted(set(a) & set(b))
    if len(utterances) != len(a) or len(utterances) != len(b):
        raise UserError("paired bootstrap: the two upstreams were scored on different test utterances")
    num_a, den_a = _arrays(a, utterances)
    num_b, den_b = _arrays(b, utterances)
    picks = np.random.default_rng(seed).integers(0, len(utterances), (samples, len(utterances)))
    diff = (100.0 * num_a[picks].sum(1) / np.maximum(den_a[picks].sum(1), 1e-12)
            - 100.0 * num_b[picks].sum(1) / np.maximum(den_b[picks].sum(1), 1e-12))
    low, high = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return percent(a) - percent(b), float(low), float(high)
