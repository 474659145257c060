"""ROUGE-L and BLEU exactly as the paper's evaluation reports them (spec §5).

ROUGE-L: ``rouge_score`` ``RougeScorer(['rougeL'], use_stemmer=True)`` F-measure × 100, max over
an example's references, averaged over examples (the reference code's protocol; a home-made LCS
or a different tokenizer would give numbers not comparable with the paper's tables).
BLEU: ``sacrebleu.corpus_bleu`` with its default 13a tokenization; a variable number of
references per example is passed to sacrebleu as ``None`` entries, which it skips.
"""

import math
from functools import lru_cache
from typing import List, Sequence, Tuple


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists"
        )
    if len(predictions) == 0:
        raise ValueError("cannot score an empty list of predictions")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"references[{i}] must be a non-empty list of strings, got {refs!r}"
            )


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of the max over references of ROUGE-L F-measure, × 100."""
    _check(predictions, references)
    scorer = _rouge_scorer()
    total = 0.0
    for pred, refs in zip(predictions, references):
        total += max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
    return 100.0 * total / len(predictions)


def bleu(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a"
) -> float:
    """Corpus BLEU (sacrebleu) of the predictions against per-example reference lists."""
    import sacrebleu

    _check(predictions, references)
    n_streams = max(len(refs) for refs in references)
    streams = [
        [refs[k] if k < len(refs) else None for refs in references] for k in range(n_streams)
    ]
    return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize).score)


def mean_std(values: Sequence[float], ddof: int = 0) -> Tuple[float, float]:
    """Mean and standard deviation (population by default, ``ddof=1`` for the sample std).

    Used for the paper's "mean ± std over seeds {10, 20, 30, 40, 50}".
    """
    vals: List[float] = [float(v) for v in values]
    if len(vals) <= ddof:
        raise ValueError(f"need more than {ddof} values for ddof={ddof}, got {len(vals)}")
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - ddof)
    return mean, math.sqrt(var)
