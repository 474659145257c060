"""The shared token sampler draws from the right distribution; MKL-packed linears compute the
same products as F.linear and are installed for the call only."""

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


# ------------------------------------------------------------------ MKL-packed linears (issue #13)

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torchtune.modules import TiedLinear  # noqa: E402

from distillm_tune.generation import _mkl_packing_available, mkl_packed_linears  # noqa: E402

needs_mkl = pytest.mark.skipif(not _mkl_packing_available(), reason="this torch build has no MKL")


class _TiedModel(nn.Module):
    """A bias-free and a biased linear layer and a head tied to an embedding, like the decoders."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 48)
        self.down = nn.Linear(48, 40, bias=False)
        self.up = nn.Linear(40, 48)
        self.output = TiedLinear(self.emb)

    def forward(self, x):
        return self.output(self.up(self.down(x)))


@needs_mkl
@pytest.mark.parametrize("rows", [1, 5, 8, 12, 16, 17, 640])
@torch.no_grad()
def test_packed_linears_equal_a_float64_product_as_closely_as_f_linear(rows):
    """Packed for 16 rows, called with any number (the sampler drops finished rows), 2-D and 3-D
    inputs: the error to a float64 product is of F.linear's size."""
    torch.manual_seed(0)
    model = _TiedModel()
    x = torch.randn(rows, 48) if rows != 640 else torch.randn(16, 40, 48)

    def ref():  # float64 reference of the whole chain
        w = {k: v.double() for k, v in model.state_dict().items()}
        h = x.double() @ w["down.weight"].T
        h = h @ w["up.weight"].T + w["up.bias"]
        return h @ w["emb.weight"].T

    plain = model(x)
    with mkl_packed_linears(model, 16):
        assert not isinstance(model.output, TiedLinear)  # the tied head was swapped too
        packed = model(x)
    expected = ref()
    err_plain = (plain.double() - expected).abs().max().item()
    err_packed = (packed.double() - expected).abs().max().item()
    assert err_packed <= max(4 * err_plain, 1e-5), (err_packed, err_plain)
    assert not torch.equal(packed, torch.zeros_like(packed))


@needs_mkl
def test_packed_linears_are_installed_for_the_call_only_and_restored_on_error():
    model = _TiedModel()
    head = model.output
    seen = []
    hook = model.up.register_forward_pre_hook(lambda m, a: seen.append("forward" in vars(m)))
    with pytest.raises(RuntimeError, match="boom"):
        with mkl_packed_linears(model, 4):
            model(torch.randn(4, 48))
            raise RuntimeError("boom")
    hook.remove()
    assert seen == [True]
    assert model.output is head and not any("forward" in vars(m) for m in model.modules())


@needs_mkl
@pytest.mark.filterwarnings("ignore:.*autocast.*")
def test_packing_leaves_other_dtypes_autocast_lora_and_disabled_calls_alone():
    from torchtune.modules.peft import LoRALinear

    def packed_modules(model, **kw):
        with mkl_packed_linears(model, 4, **kw):
            return [m for m in model.modules() if "forward" in vars(m)], not isinstance(model.output, TiedLinear)

    assert packed_modules(_TiedModel().to(torch.bfloat16)) == ([], False)
    assert packed_modules(_TiedModel(), enabled=False) == ([], False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_modules(_TiedModel()) == ([], False)
    model = _TiedModel()
    model.down = LoRALinear(48, 40, rank=4, alpha=8)
    swapped, head = packed_modules(model)
    assert model.down not in swapped and model.up in swapped and head  # LoRA keeps its own forward
