"""The shared token sampler draws from the right distribution."""

import torch

from distillm_tune.generation import sample_next_token


def test_sampling_frequencies_match_the_softmax_after_top_k_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, float("-inf"), 0.0]]).repeat(20000, 1)
    for kwargs in ({}, {"top_k": 3}, {"top_p": 0.8}, {"temperature": 0.5}):
        draws = sample_next_token(logits, generator=g, **kwargs)
        freq = torch.bincount(draws, minlength=6).double() / draws.numel()
        # independent reference: the filtered softmax written out directly
        ref_logits = logits[0].double() / kwargs.get("temperature", 1.0)
        if "top_k" in kwargs:
            ref_logits[ref_logits < ref_logits.topk(kwargs["top_k"]).values[-1]] = float("-inf")
        if "top_p" in kwargs:
            probs, order = ref_logits.softmax(-1).sort(descending=True)
            drop = order[(probs.cumsum(-1) - probs) >= kwargs["top_p"]]
            ref_logits[drop] = float("-inf")
        ref = ref_logits.softmax(-1)
        assert freq[ref == 0].sum() == 0, kwargs  # never a token outside the support (incl. -inf)
        torch.testing.assert_close(freq, ref, atol=0.012, rtol=0, msg=str(kwargs))


def test_greedy_and_reproducible():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    a = sample_next_token(logits, generator=torch.Generator().manual_seed(3))
    b = sample_next_token(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
