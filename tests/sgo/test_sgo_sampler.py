"""generate_responses: equality with an uncached reference, reproducibility, EOS handling, labels,
restoration of mode and caches, last-position-only logits."""

import contextlib
from unittest import mock

import pytest
import torch
from torchtune.models.llama2 import llama2
from torchtune.modules import MultiHeadAttention

from distillm_tune.sgo import sampler

from distillm_tune.data.collate import collate_prompt_response
from distillm_tune.generation import sample_next_token
from distillm_tune.sgo.sampler import generate_responses

VOCAB, PAD = 67, 0
PROMPTS = [[5, 9, 13], [7, 3, 22, 40, 41, 8, 11], [60], [33, 12, 19, 2, 50]]


def _model(seed=0, attn_dropout=0.0):
    torch.manual_seed(seed)
    m = llama2(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
        max_seq_len=64, intermediate_dim=64, attn_dropout=attn_dropout,
    )
    return m.eval()


@torch.no_grad()
def _reference_greedy(model, prompt, max_new, eos):
    """Independent loop: full forward on the growing unpadded sequence each step, no cache."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        tok = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return out


def test_greedy_cached_batch_equals_uncached_reference():
    model = _model()
    free = [_reference_greedy(model, p, 12, set()) for p in PROMPTS]
    eos = {free[0][3]}  # row 0 stops at its 4th token; other rows stop wherever they emit it
    expected = [_reference_greedy(model, p, 12, eos) for p in PROMPTS]
    assert len(expected[0]) == 4 and max(len(e) for e in expected) > 4  # rows stop at different steps
    got = generate_responses(model, PROMPTS, max_new_tokens=12, eos_ids=eos, pad_id=PAD, temperature=0.0)
    assert [g["prompt"] for g in got] == PROMPTS
    assert [g["response"] for g in got] == expected


@torch.no_grad()
def _reference_sampled(model, prompts, max_new, eos, seed):
    """Uncached, unbatched sampling that draws one uniform per prompt per step, as the batched
    sampler does for its whole batch: full forward on each growing sequence, no rows dropped."""
    g = torch.Generator().manual_seed(seed)
    seqs, outs, done = [list(p) for p in prompts], [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new):
        draws = torch.rand((len(prompts), 1), generator=g, dtype=torch.float64)
        for i in range(len(prompts)):
            if done[i]:
                continue
            logits = model(torch.tensor([seqs[i]]))[0, -1:]
            tok = int(sample_next_token(logits, uniforms=draws[i : i + 1])[0])
            outs[i].append(tok)
            seqs[i].append(tok)
            done[i] = tok in eos
        if all(done):
            break
    return outs


def test_finished_rows_leave_the_batch_and_sampling_is_unchanged():
    model = _model()
    prompts = PROMPTS * 3  # 12 rows
    free = _reference_sampled(model, prompts, 16, set(), seed=5)
    # the EOS: the token the rows emit most often in the first 8 steps -> rows stop at different steps
    counts = torch.bincount(torch.tensor([t for row in free for t in row[:8]]), minlength=VOCAB)
    eos = {int(counts.argmax())}
    expected = _reference_sampled(model, prompts, 16, eos, seed=5)
    lengths = sorted(len(e) for e in expected)
    assert lengths[0] < lengths[-1] and sum(length < 16 for length in lengths) >= 3, lengths

    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    got = generate_responses(model, prompts, max_new_tokens=16, eos_ids=eos, pad_id=PAD,
                             generator=torch.Generator().manual_seed(5))
    hook.remove()
    assert [g["response"] for g in got] == expected
    assert batch_sizes[0] == 12 and min(batch_sizes) < 12  # finished rows were dropped
    assert batch_sizes == sorted(batch_sizes, reverse=True)


def test_only_last_position_is_projected_to_vocab():
    model = _model()
    shapes = []
    h = model.output.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    generate_responses(model, PROMPTS, max_new_tokens=5, eos_ids={PAD}, pad_id=PAD, temperature=0.0)
    h.remove()
    assert shapes and all(s[1] == 1 for s in shapes), shapes
    assert len(model.norm._forward_pre_hooks) == 0  # hook removed


def test_sampling_is_reproducible_with_a_generator():
    model = _model()

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate_responses(model, PROMPTS, max_new_tokens=10, eos_ids={1}, pad_id=PAD, generator=g, **kw)

    assert run(11) == run(11)
    assert run(11) != run(12)
    assert run(11, top_k=5, top_p=0.9, temperature=0.7) == run(11, top_k=5, top_p=0.9, temperature=0.7)
    greedy = generate_responses(model, PROMPTS, max_new_tokens=10, eos_ids={1}, pad_id=PAD, temperature=0.0)
    assert run(11, top_k=1) == greedy
    assert run(11, top_p=1e-6) == greedy


def test_top_k_and_top_p_support():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).repeat(400, 1)
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        return set(sample_next_token(logits, kw.pop("temperature", 1.0), kw.get("top_k"), kw.get("top_p", 1.0), g).tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {1, 3}
    assert support(top_k=3) == {1, 2, 3}
    assert support(top_p=0.8) == {1, 3}  # 0.5 + 0.3 reaches 0.8
    assert support(top_p=0.81) == {1, 2, 3}
    assert support(top_p=0.5) == {1}
    assert support(temperature=0.0) == {1}


def test_eos_kept_nothing_after_and_labels_shifted():
    model = _model()
    free = [_reference_greedy(model, p, 8, set()) for p in PROMPTS]
    eos_tok = free[1][2]
    got = generate_responses(model, PROMPTS, max_new_tokens=8, eos_ids={eos_tok}, pad_id=PAD, temperature=0.0)
    for g, f in zip(got, free):
        r = g["response"]
        if eos_tok in f:
            k = f.index(eos_tok)
            assert r == f[: k + 1] and r[-1] == eos_tok  # EOS kept, nothing after it
        else:
            assert r == f and len(r) == 8  # no EOS: exactly max_new_tokens tokens
    assert got[1]["response"][-1] == eos_tok and len(got[1]["response"]) == 3
    batch = collate_prompt_response(got, pad_id=PAD)
    for i, g in enumerate(got):
        p, r = g["prompt"], g["response"]
        seq = p + r
        assert batch["tokens"][i, : len(seq)].tolist() == seq
        lab = batch["labels"][i]
        assert (lab[: len(p) - 1] == -100).all()
        assert lab[len(p) - 1 : len(seq) - 1].tolist() == seq[len(p) :]  # labels[t] == tokens[t+1]
        assert (lab[len(seq) - 1 :] == -100).all()


def test_mode_and_caches_restored_even_on_error():
    model = _model()
    model.train()
    model.layers[1].mlp.eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    seen = []
    h = model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    generate_responses(model, PROMPTS, max_new_tokens=4, eos_ids={PAD}, pad_id=PAD)
    h.remove()
    assert seen and not any(seen)  # every forward ran in eval mode
    assert {n: m.training for n, m in model.named_modules()} == before
    assert not model.caches_are_setup() and not model.caches_are_enabled()

    calls = []

    def boom(m, a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    h = model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        generate_responses(model, PROMPTS, max_new_tokens=6, eos_ids={PAD}, pad_id=PAD)
    h.remove()
    assert {n: m.training for n, m in model.named_modules()} == before
    assert not model.caches_are_setup()
    assert len(model.norm._forward_pre_hooks) == 0


def test_dropout_model_in_train_mode_generates_like_eval_mode():
    model = _model(attn_dropout=0.5)
    model.train()
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout really is active in train mode
    kw = dict(max_new_tokens=10, eos_ids={1}, pad_id=PAD, temperature=0.0)
    from_train = generate_responses(model, PROMPTS, **kw)
    assert model.training
    model.eval()
    assert generate_responses(model, PROMPTS, **kw) == from_train


def test_errors():
    model = _model()
    kw = dict(eos_ids={1}, pad_id=PAD)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_responses(model, [[1] * 60], max_new_tokens=5, **kw)
    with pytest.raises(ValueError, match="max_new_tokens.*0"):
        generate_responses(model, PROMPTS, max_new_tokens=0, **kw)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_responses(model, [[1], []], max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="non-empty"):
        generate_responses(model, [], max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="top_p.*1.5"):
        generate_responses(model, PROMPTS, max_new_tokens=2, top_p=1.5, **kw)
    with pytest.raises(ValueError, match="top_k.*0"):
        generate_responses(model, PROMPTS, max_new_tokens=2, top_k=0, **kw)
    with pytest.raises(ValueError, match="temperature.*-1"):
        generate_responses(model, PROMPTS, max_new_tokens=2, temperature=-1.0, **kw)
    model.setup_caches(1, torch.float32, decoder_max_seq_len=16)
    with pytest.raises(ValueError, match="already has KV caches"):
        generate_responses(model, PROMPTS, max_new_tokens=2, **kw)
    assert model.caches_are_setup()  # left as found


def test_positions_count_from_each_rows_first_real_token():
    """RoPE is shift invariant, so the greedy equality above cannot see wrong positions; learned
    absolute positions (GPT-2, OPT) can. Check the input_pos handed to the model directly."""
    model = _model()
    calls = []
    h = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a[0].clone(), kw["input_pos"].clone(), kw["mask"].clone())), with_kwargs=True
    )
    generate_responses(model, PROMPTS, max_new_tokens=3, eos_ids=set(), pad_id=PAD, temperature=0.0)
    h.remove()
    plen = max(len(p) for p in PROMPTS)
    (tok0, pos0, mask0), steps = calls[0], calls[1:]
    assert len(steps) == 2  # prompt pass + max_new_tokens - 1 decode passes
    for i, p in enumerate(PROMPTS):
        npad = plen - len(p)
        assert tok0[i].tolist() == [PAD] * npad + p
        assert pos0[i].tolist() == [0] * npad + list(range(len(p)))
        # real queries never attend to padding or to the future
        assert not mask0[i, npad:, :npad].any()
        assert torch.equal(mask0[i, npad:, npad:plen], torch.ones(len(p), len(p)).tril().bool())  # booleans
        for t, (_, pos, mask) in enumerate(steps):
            assert pos[i].tolist() == [len(p) + t]
            assert mask[i, 0].tolist() == [False] * npad + [True] * (len(p) + t + 1) + [False] * (2 - t)


def test_eos_ids_must_be_a_collection():
    with pytest.raises(ValueError, match="eos_ids.*2"):
        generate_responses(_model(), PROMPTS, max_new_tokens=2, eos_ids=2, pad_id=PAD)


# --------------------------------------------------------------------- prefix attention (issue #13)


@contextlib.contextmanager
def _stock_attention(model):
    """Stand-in for ``sampler._prefix_attention`` that installs nothing: torchtune's own forward."""
    yield sampler._PrefixState()


def _logits_of_every_forward(model, prompts, fast, **kw):
    outs = []
    # the final norm's output: the last position's hidden state, which the (possibly tied) head projects
    h = model.norm.register_forward_hook(lambda m, i, o: outs.append(o.detach().float().clone()))
    try:
        with contextlib.nullcontext() if fast else mock.patch.object(sampler, "_prefix_attention", _stock_attention):
            got = generate_responses(model, prompts, pad_id=PAD, **kw)
    finally:
        h.remove()
    return got, outs


def _learned_position_model(seed=0):
    from distillm_tune.models.modules import learned_position_decoder

    torch.manual_seed(seed)
    return learned_position_decoder(vocab_size=VOCAB, num_layers=2, num_heads=4, embed_dim=32, intermediate_dim=64,
                                    max_seq_len=64, activation_name="gelu_new").eval()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune RMSNorm in bf16
@pytest.mark.parametrize("family", ["llama_gqa", "llama_mha", "gpt2_like", "llama_gqa_bf16"])
def test_prefix_attention_gives_the_hidden_states_and_tokens_of_torchtunes_attention(family):
    """The generation-time attention (filled cache prefix, enable_gqa, one RoPE call for q and k,
    the mask converted once per forward) reproduces torchtune's MultiHeadAttention.forward: every
    forward's final hidden state (so its logits) is equal within the dtype's rounding (the two call
    different SDPA kernels, whose sums agree bitwise on some CPUs only) and the tokens are identical, for left-padded prompts of
    lengths 1..7, over more than one PREFIX_MULTIPLE of cache slots, with rows leaving the batch;
    greedy and sampled tokens are the same."""
    if family == "gpt2_like":
        model = _learned_position_model()
    else:
        torch.manual_seed(0)
        model = llama2(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2 if "gqa" in family else 4,
                       embed_dim=32, max_seq_len=64, intermediate_dim=64).eval()
    if family.endswith("bf16"):
        model = model.to(torch.bfloat16)
    prompts = PROMPTS * 2
    free = generate_responses(model, prompts, max_new_tokens=30, eos_ids=set(), pad_id=PAD, temperature=0.0)
    counts = torch.bincount(torch.tensor([t for r in free for t in r["response"][:12]]), minlength=VOCAB)
    kw = dict(max_new_tokens=30, eos_ids={int(counts.argmax())}, temperature=0.0)
    fast, fast_logits = _logits_of_every_forward(model, prompts, True, **kw)
    stock, stock_logits = _logits_of_every_forward(model, prompts, False, **kw)
    assert fast == stock
    assert len({len(g["response"]) for g in fast}) > 1  # rows stopped at different steps
    assert max(len(p) for p in PROMPTS) + 30 > 2 * sampler.PREFIX_MULTIPLE  # the prefix grew past a multiple
    assert len(fast_logits) == len(stock_logits) > 1
    for a, b in zip(fast_logits, stock_logits):
        torch.testing.assert_close(a, b)  # the dtype's default rtol/atol (fp32: 1.3e-6/1e-5, bf16: 1.6e-2/1e-5)
    # sampled: the same draws and tokens through both attentions
    skw = dict(max_new_tokens=30, eos_ids=kw["eos_ids"], temperature=0.8, top_p=0.9)
    a, _ = _logits_of_every_forward(model, prompts, True, generator=torch.Generator().manual_seed(3), **skw)
    b, _ = _logits_of_every_forward(model, prompts, False, generator=torch.Generator().manual_seed(3), **skw)
    assert a == b


def test_prefix_attention_is_installed_for_the_call_only():
    model = _model()
    attn = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    seen = []
    h = attn[0].register_forward_pre_hook(lambda m, a: seen.append("forward" in vars(m)))
    generate_responses(model, PROMPTS, max_new_tokens=3, eos_ids=set(), pad_id=PAD, temperature=0.0)
    h.remove()
    assert seen and all(seen)  # every forward of the call went through the generation-time forward
    assert not any("forward" in vars(m) or hasattr(m, "_distillm_prefix_state") for m in attn)
    # restored on error too
    h = model.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        generate_responses(model, PROMPTS, max_new_tokens=3, eos_ids=set(), pad_id=PAD)
    h.remove()
    assert not any("forward" in vars(m) for m in attn)


def test_attention_subclasses_with_their_own_attention_call_are_left_alone():
    from distillm_tune.models.t5._model import T5Attention

    assert not any(sampler._is_plain_attention(m) for m in _t5_attention_modules(T5Attention))
    assert all(sampler._is_plain_attention(m) for m in _model().modules() if isinstance(m, MultiHeadAttention))


def _t5_attention_modules(cls):
    lin = lambda: torch.nn.Linear(8, 8, bias=False)  # noqa: E731
    return [cls(num_heads=2, head_dim=4, q_proj=lin(), k_proj=lin(), v_proj=lin(), output_proj=lin())]
