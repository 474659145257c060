"""degenerate_reason against its definition, case by case, and a brute-force count of repeated bigrams."""

import random

import pytest

from distillm_tune.sgo import degenerate_reason

EOS = 2


@pytest.mark.parametrize("response, reason", [
    ([], "empty"),
    ([EOS], "eos_only"),
    ([EOS, 3], "eos_only"),  # another stop id
    ([5, 5, 5, 5, 5, EOS], "repetitive"),
    ([1, 4, 6, 1, 4, 6, 1, 4, 6, 1, 4, 6, EOS], "repetitive"),  # a looping phrase
    ([1, 4, 6, 8, 9, 11, EOS], None),
    ([1, 4, EOS], None),  # short answers are never "repetitive"
    ([5, 5, 5], None),  # fewer than 3 bigrams
])
def test_cases(response, reason):
    assert degenerate_reason(response, [EOS, 3]) == reason


def test_repetitive_is_more_than_the_fraction_of_repeated_bigrams():
    rng = random.Random(0)
    for _ in range(300):
        content = [rng.randrange(4, 9) for _ in range(rng.randrange(4, 20))]
        grams = list(zip(content, content[1:]))
        repeated = sum(1 for i, g in enumerate(grams) if g in grams[:i])
        for limit in (0.2, 0.5, 0.8):
            expected = "repetitive" if repeated / len(grams) > limit else None
            assert degenerate_reason(content + [EOS], [EOS], limit) == expected


def test_bad_limit():
    with pytest.raises(ValueError, match=r"max_repeated_fraction must lie in \[0, 1\]"):
        degenerate_reason([1], [EOS], 1.5)
