"""Attack-success metrics: ROUGE, token accuracy, exact match, with Hungarian matching.

The order of sentences in a batch is unknown to the attacker, so each
reconstruction is first matched to one reference by the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) on cost ``1 − ROUGE-1 F``, as LAMP
and DAGER's encoder evaluation do (attacks-and-auditing.md §1.0). Scores are
then averaged over the *references*: an unmatched reference (the attack
recovered fewer sentences than the batch held) scores 0, and surplus
reconstructions are ignored by the averages but counted in ``n_predictions``.

* ROUGE-1/2/L F-measure from the ``rouge-score`` package (Google's reference
  implementation; its default tokenizer lowercases and splits on non-alphanumerics);
* token accuracy: the fraction of a reference's tokens reproduced at the same
  position (tokens = the model tokenizer's ids when given, else whitespace words);
* exact match: the matched reconstruction equals the reference (whitespace-normalised).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment

Tokenize = Callable[[str], Sequence[int | str]]


@dataclass(frozen=True)
class TextScores:
    """Mean scores over the references of one target (0 where nothing matched)."""

    rouge1: float
    rouge2: float
    rougeL: float
    token_accuracy: float
    exact_match: float
    n_references: int
    n_predictions: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def _norm(text: str) -> str:
    return " ".join(text.split())


def token_accuracy(prediction: Sequence[int | str], reference: Sequence[int | str]) -> float:
    """Fraction of reference positions whose token the prediction reproduces in place."""
    if not reference:
        return 1.0 if not prediction else 0.0
    hits = sum(1 for p, r in zip(prediction, reference, strict=False) if p == r)
    return hits / len(reference)


def score_texts(
    predictions: Sequence[str], references: Sequence[str], *, tokenize: Tokenize | None = None
) -> TextScores:
    """Match ``predictions`` to ``references`` (Hungarian on 1 − ROUGE-1 F) and average the scores."""
    n_ref, n_pred = len(references), len(predictions)
    if n_ref == 0:
        return TextScores(0.0, 0.0, 0.0, 0.0, 0.0, 0, n_pred)
    if n_pred == 0:
        return TextScores(0.0, 0.0, 0.0, 0.0, 0.0, n_ref, 0)
    scorer = _scorer()
    table = [[scorer.score(ref, pred) for pred in predictions] for ref in references]
    cost = np.array([[1.0 - cell["rouge1"].fmeasure for cell in row] for row in table])
    rows, cols = linear_sum_assignment(cost)
    tok = tokenize or (lambda s: s.split())
    r1 = r2 = rl = acc = em = 0.0
    for i, j in zip(rows, cols, strict=True):
        cell = table[i][j]
        r1 += cell["rouge1"].fmeasure
        r2 += cell["rouge2"].fmeasure
        rl += cell["rougeL"].fmeasure
        acc += token_accuracy(list(tok(predictions[j])), list(tok(references[i])))
        em += float(_norm(predictions[j]) == _norm(references[i]))
    return TextScores(r1 / n_ref, r2 / n_ref, rl / n_ref, acc / n_ref, em / n_ref, n_ref, n_pred)


def score_bag(tokens: Sequence[int], references: Sequence[Sequence[int]]) -> dict[str, float]:
    """Precision and recall of a recovered multiset of tokens against the references' tokens.

    For order-free attacks (bag of tokens): ``recall`` is the share of the
    references' tokens (with multiplicity) that the bag contains,
    ``distinct_recall`` the share of distinct reference tokens found.
    """
    ref = Counter(t for seq in references for t in seq)
    got = Counter(tokens)
    inter = sum((ref & got).values())
    n_ref, n_got = sum(ref.values()), sum(got.values())
    return {
        "precision": inter / n_got if n_got else 0.0,
        "recall": inter / n_ref if n_ref else 0.0,
        "distinct_recall": len(set(ref) & set(got)) / len(ref) if ref else 0.0,
    }
