import statistics

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from distillm_tune.eval import bleu, mean_std, rouge_l

PREDS = [
    "The cats are running quickly across the garden.",
    "Paris is the capital of France",
    "",
    "I don't know.",
]
REFS = [
    ["A cat ran across the gardens quickly.", "Cats run in the garden."],
    ["The capital of France is Paris."],
    ["Something."],
    ["No idea, sorry.", "I do not know.", "Unknown"],
]


def test_rouge_l_matches_rouge_score_with_multi_reference_max():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per_example = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
                   for p, refs in zip(PREDS, REFS)]
    expected = 100 * sum(per_example) / len(per_example)
    assert rouge_l(PREDS, REFS) == pytest.approx(expected, abs=1e-12)
    # the max matters: scoring only the first reference gives a different number here
    first_only = 100 * sum(scorer.score(refs[0], p)["rougeL"].fmeasure
                           for p, refs in zip(PREDS, REFS)) / len(PREDS)
    assert rouge_l(PREDS, REFS) > first_only
    # stemming is on: "cats running" vs "cat run" is a full match
    assert rouge_l(["cats running"], [["cat run"]]) == pytest.approx(100.0)
    assert rouge_l(["x"], [["x"]]) == pytest.approx(100.0)


def test_bleu_matches_sacrebleu():
    preds = ["Das Haus ist klein.", "Ich habe keine Zeit.", "Danke schön für alles."]
    refs = [["Das Haus ist klein.", "Das Haus ist winzig."],
            ["Ich habe heute keine Zeit.", "Ich hab keine Zeit."],
            ["Vielen Dank für alles.", "Danke für alles."]]
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    assert bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    single = [[r[0]] for r in refs]
    assert bleu(preds, single) == pytest.approx(
        sacrebleu.corpus_bleu(preds, [streams[0]]).score)
    # a variable number of references is passed as None entries, which sacrebleu skips
    ragged = [refs[0], [refs[1][0]], refs[2]]
    expected = sacrebleu.corpus_bleu(
        preds, [streams[0], [refs[0][1], None, refs[2][1]]]).score
    assert bleu(preds, ragged) == pytest.approx(expected)


def test_mean_std():
    vals = [25.1, 26.3, 24.9, 25.7, 26.0]
    m, s = mean_std(vals)
    assert m == pytest.approx(statistics.fmean(vals))
    assert s == pytest.approx(statistics.pstdev(vals))
    assert mean_std(vals, ddof=1)[1] == pytest.approx(statistics.stdev(vals))
    assert mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


@pytest.mark.parametrize("fn", [rouge_l, bleu])
def test_argument_errors(fn):
    with pytest.raises(ValueError, match="2 predictions but 1"):
        fn(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty list of predictions"):
        fn([], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        fn(["a"], ["a"])  # a bare string, not a list of references
    with pytest.raises(ValueError, match=r"references\[0\]"):
        fn(["a"], [[]])
