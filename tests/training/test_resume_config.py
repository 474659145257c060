"""training/resume.py on its own: which per-rank batch sizes may change with the number of ranks."""

import pytest

from distillm_tune.training.resume import config_changes

CKPT = "/out/checkpoints/step_00000004"


def _cfg(batch_size=4, lm_dataset=None, lm_batch_size=4, lm_coef=1.0):
    return {"method": "kd", "seed": 1, "batch_size": batch_size, "gradient_accumulation_steps": 1,
            "lm": {"dataset": lm_dataset, "coef": lm_coef, "batch_size": lm_batch_size}, "output_dir": "/out"}


@pytest.mark.parametrize("saved_world, world, before, after", [(2, 1, 4, 8), (1, 2, 8, 4), (2, 2, 4, 4), (1, 1, 8, 8)])
def test_a_per_rank_batch_size_that_keeps_the_global_batch_is_accepted(saved_world, world, before, after):
    changes = config_changes(_cfg(before), _cfg(after), CKPT, saved_world, world)
    assert changes == ([] if before == after else [("batch_size", before, after)])


@pytest.mark.parametrize("saved_world, world, before, after, total, now, fix", [
    (2, 1, 4, 4, 8, 4, "Set batch_size=8"),  # the number of ranks changed, the per-rank size not
    (1, 2, 8, 8, 8, 16, "Set batch_size=4"),
    (1, 1, 8, 4, 8, 4, "Set batch_size=8"),  # the same ranks, another batch
    (1, 3, 8, 3, 8, 9, "Use a number of processes that divides 8"),
])
def test_a_per_rank_batch_size_that_changes_the_global_batch_is_refused_naming_it(saved_world, world, before, after,
                                                                                  total, now, fix):
    with pytest.raises(ValueError) as e:
        config_changes(_cfg(before), _cfg(after), CKPT, saved_world, world)
    message = str(e.value)
    assert message.startswith(f"config batch_size: is {after} on {world} rank(s) but '{CKPT}' was written with "
                              f"{before} on {saved_world} rank(s)")
    assert f"stays {total}, it would be {now}. {fix}" in message


def test_the_lm_batch_follows_the_same_rule_when_the_lm_term_is_on():
    corpus = "/data/corpus.txt"
    # off: lm.batch_size is not used, so only batch_size counts
    assert config_changes(_cfg(4), _cfg(8), CKPT, 2, 1) == [("batch_size", 4, 8)]
    with pytest.raises(ValueError, match=r"config lm.batch_size: is 4 on 1 rank\(s\) .* stays 8, it would be 4. "
                                         r"Set lm.batch_size=8"):
        config_changes(_cfg(4, corpus, 4), _cfg(8, corpus, 4), CKPT, 2, 1)
    assert config_changes(_cfg(4, corpus, 4), _cfg(8, corpus, 8), CKPT, 2, 1) == [
        ("batch_size", 4, 8), ("lm.batch_size", 4, 8)]
    # null: it follows batch_size, which already keeps the global batch
    assert config_changes(_cfg(4, corpus, None), _cfg(8, corpus, None), CKPT, 2, 1) == [("batch_size", 4, 8)]
    # another LM setting is still refused as before
    with pytest.raises(ValueError, match=r"config lm: .*cannot change when resuming"):
        config_changes(_cfg(4, corpus, 4), _cfg(4, corpus, 4, lm_coef=0.5), CKPT, 1, 1)
