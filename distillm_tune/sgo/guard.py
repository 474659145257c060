"""Degenerate student outputs: what the collapse guard refuses to train on.

On a real teacher (SmolLM2-135M-Instruct) with an untrained layer-dropped student, ``distillm``'s
first steps trained on the student's own gibberish and the student learned to end every answer at
once (issue #12). An SGO sample is degenerate when its response, without its final stop token, is

* ``empty``: no token at all (the sampler returned nothing),
* ``eos_only``: nothing but stop tokens (the student answered with end-of-turn at once),
* ``repetitive``: at least ``MIN_NGRAMS`` bigrams, of which more than ``max_repeated_fraction``
  repeat an earlier bigram of the same response ("the the the", a looping phrase). Natural text
  repeats few bigrams; a loop of period k repeats all but the first k.

The recipe masks such samples out of the loss, keeps them out of the replay buffer, logs their
number and warns that the student needs SFT first.
"""

from typing import Iterable, List, Optional

NGRAM = 2
MIN_NGRAMS = 3


def degenerate_reason(response: List[int], stop_ids: Iterable[int], max_repeated_fraction: float = 0.5) -> Optional[str]:
    """``"empty"``, ``"eos_only"``, ``"repetitive"`` or None (a usable response)."""
    if not 0.0 <= max_repeated_fraction <= 1.0:
        raise ValueError(f"max_repeated_fraction must lie in [0, 1], got {max_repeated_fraction!r}")
    if len(response) == 0:
        return "empty"
    stops = set(int(s) for s in stop_ids)
    content = [int(t) for t in response if int(t) not in stops]
    if not content:
        return "eos_only"
    grams = [tuple(content[i : i + NGRAM]) for i in range(len(content) - NGRAM + 1)]
    if len(grams) >= MIN_NGRAMS:
        repeated = len(grams) - len(set(grams))
        if repeated / len(grams) > max_repeated_fraction:
            return "repetitive"
    return None
