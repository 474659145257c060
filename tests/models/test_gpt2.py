"""GPT-2 port against transformers' own GPT2LMHeadModel / GPT2Tokenizer (tiny, random, fp32, offline).

Padded batches are left-padded; both sides get the same explicit positions (``cumsum(mask) - 1``
clipped at 0) and logits are compared on real tokens only (pad rows attend to nothing real).
"""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.peft import get_merged_lora_ckpt
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from distillm_tune.models import LoRASettings, family_for
from distillm_tune.models.gpt2 import FAMILY, gpt2_base, gpt2_medium, gpt2_large, gpt2_xl, lora_gpt2_base

ATOL = 1e-5
VOCAB = 101


def padded_batch(batch=3, seq=10, pads=(0, 3, 8), vocab=VOCAB, seed=0):
    """Left-padded tokens, boolean padding mask, positions and the [B, S, S] causal+padding mask."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    real = torch.ones(batch, seq, dtype=torch.bool)
    for row, n in enumerate(pads):
        real[row, :n] = False
    pos = get_position_ids_from_padding_mask(real)
    return tokens, real, pos, get_causal_mask_from_padding_mask(real)


def hf_logits(model, tokens, real, pos):
    with torch.no_grad():
        return model(tokens, attention_mask=real.long(), position_ids=pos.long()).logits


def tune_logits(model, tokens, real, pos, mask):
    with torch.no_grad():
        return model(tokens, mask=mask, input_pos=pos)


def max_diff(a, b, real):
    return (a - b)[real].abs().max().item()


@pytest.fixture(scope="module")
def config():
    # initializer_range 0.2: logits of order 1 (std ~1), so a 1e-5 tolerance means something
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                      initializer_range=0.2, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


@pytest.fixture(scope="module")
def hf_model(config):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for name, p in model.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(path)  # transformers-5 key form, safetensors
    return path


def load_tune(config, state_dict, lora=None):
    model = FAMILY.build(config.to_dict(), lora).eval()
    model.load_state_dict(FAMILY.hf_to_tune(state_dict, config.to_dict()), strict=lora is None)
    return model


@pytest.fixture(scope="module")
def tune_model(config, saved_dir):
    return load_tune(config, load_file(os.path.join(saved_dir, "model.safetensors")))


def test_registry_and_sizes():
    assert family_for("gpt2") is FAMILY
    with torch.device("meta"):
        counts = [sum(p.numel() for p in f().parameters()) for f in (gpt2_base, gpt2_medium, gpt2_large, gpt2_xl)]
        lora_gpt2_base(["q_proj", "v_proj"])
    # transformers' parameter counts for gpt2 / -medium / -large / -xl (tied head counted once)
    assert counts == [124439808, 354823168, 774030080, 1557611200]


def test_logits_match_hf_on_left_padded_batch(hf_model, tune_model):
    tokens, real, pos, mask = padded_batch()
    diff = max_diff(tune_logits(tune_model, tokens, real, pos, mask), hf_logits(hf_model, tokens, real, pos), real)
    print(f"gpt2 padded-batch max |logit diff| = {diff:.3g}")
    assert diff < ATOL
    # No positions or mask given: arange positions and the causal default on both sides.
    with torch.no_grad():
        diff = (tune_model(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff < ATOL


def test_kv_cache_decoding_matches_full_forward(config, hf_model, saved_dir, tune_model):
    prompt_len, total = 6, 11
    tokens, real, pos, mask = padded_batch(seq=total, pads=(0, 2, 5), seed=1)
    full = tune_logits(tune_model, tokens, real, pos, mask)
    model = load_tune(config, load_file(os.path.join(saved_dir, "model.safetensors")))
    model.setup_caches(batch_size=3, dtype=torch.float32, decoder_max_seq_len=total)
    with torch.no_grad():
        steps = [model(tokens[:, :prompt_len], mask=mask[:, :prompt_len], input_pos=pos[:, :prompt_len])]
        for t in range(prompt_len, total):  # input_pos [b]: one position per sequence, as generate() passes
            steps.append(model(tokens[:, t:t + 1], mask=mask[:, t:t + 1], input_pos=pos[:, t]))
    diff = max_diff(torch.cat(steps, dim=1), full, real)
    print(f"gpt2 kv-cache vs full max |logit diff| = {diff:.3g}")
    assert diff < ATOL
    assert max_diff(full, hf_logits(hf_model, tokens, real, pos), real) < ATOL


def test_torchtune_generate_matches_transformers_greedy(config, hf_model, saved_dir):
    """torchtune's batched, left-padded, KV-cached ``generate`` (greedy) gives transformers'
    ``generate`` tokens: positions from ``input_pos`` of shape [b] per step are right."""
    from torchtune.generation import generate

    pad = VOCAB - 1
    prompt = torch.randint(3, VOCAB - 2, (3, 6), generator=torch.Generator().manual_seed(2))
    prompt[1, :2] = pad
    prompt[2, :4] = pad
    model = load_tune(config, load_file(os.path.join(saved_dir, "model.safetensors")))
    model.setup_caches(batch_size=3, dtype=torch.float32, decoder_max_seq_len=6 + 8)
    ours, _ = generate(model, prompt, max_generated_tokens=8, pad_id=pad, top_k=1)
    theirs = hf_model.generate(prompt, attention_mask=(prompt != pad).long(), max_new_tokens=8,
                               do_sample=False, pad_token_id=pad, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_hub_key_form_with_buffers_loads(config, hf_model, tune_model):
    """Hub files: no ``transformer.`` prefix, attn.bias / attn.masked_bias buffers, lm_head."""
    n = config.n_positions
    hub = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    for i in range(config.n_layer):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model = load_tune(config, hub)  # strict=True
    for key, value in tune_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_tune_to_hf_loads_into_transformers(config, hf_model, tune_model, tmp_path):
    exported = FAMILY.tune_to_hf(tune_model.state_dict(), config.to_dict())
    reference = hf_model.state_dict()
    for key, value in exported.items():
        assert torch.equal(value, reference[key]), key
    config.save_pretrained(tmp_path)
    save_file(exported, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    loaded, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    tokens, real, pos, _ = padded_batch()
    assert max_diff(hf_logits(loaded.eval(), tokens, real, pos), hf_logits(hf_model, tokens, real, pos), real) == 0


def peft_without_torchao(monkeypatch):
    """peft >= 0.18.1 raises ImportError in plain-LoRA injection when torchao < 0.16 is installed
    (``dispatch_torchao`` -> ``is_torchao_available``); torchtune 0.6.1 needs torchao <= 0.14.
    The adapters here are not torchao-quantized, so tell that one dispatcher torchao is absent."""
    import peft.tuners.lora.torchao as peft_torchao

    monkeypatch.setattr(peft_torchao, "is_torchao_available", lambda: False)


LORA_CASES = [
    LoRASettings(("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0),
    LoRASettings(("q_proj", "k_proj", "v_proj"), lora_rank=2, lora_alpha=3.0),
    LoRASettings(("k_proj",), lora_rank=3, lora_alpha=5.0),
]


@pytest.mark.parametrize("lora", LORA_CASES, ids=["qv_o_mlp", "qkv", "k"])
def test_lora_merge_and_peft_export(config, saved_dir, lora, tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel

    peft_without_torchao(monkeypatch)

    base_sd = load_file(os.path.join(saved_dir, "model.safetensors"))
    model = load_tune(config, base_sd, lora)
    torch.manual_seed(1)
    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert lora_sd and set(model.state_dict()) - set(lora_sd) == set(FAMILY.hf_to_tune(base_sd, config.to_dict()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.2)
    tokens, real, pos, mask = padded_batch()
    lora_logits = tune_logits(model, tokens, real, pos, mask)

    # Merged weights exported to HF.
    merged = get_merged_lora_ckpt({k: v.clone() for k, v in model.state_dict().items()},
                                  rank=lora.lora_rank, alpha=lora.lora_alpha)
    merged_hf = GPT2LMHeadModel(config).eval()
    merged_hf.load_state_dict(FAMILY.tune_to_hf(merged, config.to_dict()), strict=False)
    merged_diff = max_diff(hf_logits(merged_hf, tokens, real, pos), lora_logits, real)

    # PEFT adapter on the HF base.
    peft_sd, targets, extra = FAMILY.lora_to_peft(model.state_dict(), config.to_dict(), lora)
    LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha, lora_dropout=0.0, target_modules=targets,
               **extra).save_pretrained(tmp_path)
    save_file(peft_sd, os.path.join(tmp_path, "adapter_model.safetensors"))
    base_hf = GPT2LMHeadModel.from_pretrained(saved_dir).eval()
    base_logits = hf_logits(base_hf, tokens, real, pos)  # PEFT wraps base_hf in place below
    peft_model = PeftModel.from_pretrained(base_hf, tmp_path).eval()
    names = set(peft_model.state_dict())
    for key in peft_sd:
        assert key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.") in names, key
    peft_diff = max_diff(hf_logits(peft_model, tokens, real, pos), lora_logits, real)
    print(f"gpt2 lora {lora.lora_attn_modules} merged diff = {merged_diff:.3g}, peft diff = {peft_diff:.3g}")
    assert merged_diff < ATOL and peft_diff < ATOL
    # the adapters really change the output
    assert max_diff(base_logits, lora_logits, real) > 1e-3


def test_lora_rejects_tied_output():
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        with torch.device("meta"):
            lora_gpt2_base(["q_proj"], apply_lora_to_output=True)


def test_mismatched_config_names_key_and_shapes(config, hf_model):
    bad = config.to_dict() | {"vocab_size": VOCAB + 2}
    with pytest.raises(ValueError, match=r"wte\.weight: checkpoint shape \(101, 32\) but the config implies \(103, 32\)"):
        FAMILY.hf_to_tune(hf_model.state_dict(), bad)
    bad = config.to_dict() | {"n_inner": 48}
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight: checkpoint shape \(32, 128\) but the config implies \(32, 48\)"):
        FAMILY.hf_to_tune(hf_model.state_dict(), bad)


def test_unexpected_and_missing_keys_are_named(config, hf_model):
    sd = dict(hf_model.state_dict())
    sd["transformer.h.0.crossattention.c_attn.weight"] = torch.zeros(32, 64)
    del sd["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match=r"unexpected keys \['h\.0\.crossattention\.c_attn\.weight'\].*missing keys \['ln_f\.bias'\]"):
        FAMILY.hf_to_tune(sd, config.to_dict())
    sd = dict(hf_model.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head"):
        FAMILY.hf_to_tune(sd, config.to_dict())


@pytest.mark.parametrize("key,value,match", [
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("activation_function", "swish", "activation_function 'swish'"),
    ("tie_word_embeddings", False, "tie_word_embeddings"),
])
def test_unsupported_config_is_rejected(config, key, value, match):
    with pytest.raises(ValueError, match=match):
        FAMILY.build(config.to_dict() | {key: value}, None)


# ---------------------------------------------------------------- tokenizer


def training_text(n=300, seed=0):
    rng = random.Random(seed)
    pieces = ["ka", "to", "ri", "men", "zu", "ly", "the", "and", "ing", "é", "日本", "  ", "\n", "42", "!", "'s"]
    return [" ".join("".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
                     for _ in range(rng.randint(3, 12))) for _ in range(n)]


TEXTS = [
    "the kato riming",
    " leading space",
    "   three spaces and trailing  ",
    "line\nbreak\n\n",
    "special <|endoftext|> inside<|endoftext|>",
    "<|endoftext|>",
    "unicode é 日本 and emoji 🙂",
    "digits 4242 and 's contractions",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("gpt2_tok")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(training_text(), vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(path / "tokenizer.json"))
    tok.save_model(str(path))  # vocab.json + merges.txt as well
    return path


def test_tokenizer_ids_match_transformers(tokenizer_dir, tmp_path):
    reference = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    # same files without tokenizer.json: the vocab.json + merges.txt path
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    for path in (tokenizer_dir, tmp_path):
        tok = FAMILY.load_tokenizer(str(path), 64)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)
        assert tok.vocab_size == len(reference) and tok.max_seq_len == 64
        for text in TEXTS:
            ids = reference(text)["input_ids"]
            assert tok.encode(text) == ids, text
            assert tok.encode(text, add_bos=True, add_eos=True) == [0] + ids + [0]
            assert tok.decode(ids) == reference.decode(ids)
            assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    json.loads((tokenizer_dir / "tokenizer.json").read_text())  # a real tokenizer.json was exercised
