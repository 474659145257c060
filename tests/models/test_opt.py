"""OPT port against transformers' own OPTForCausalLM / OPT tokenizer (tiny, random, fp32, offline).

Two architectures: pre-LN (125m/1.3b/2.7b style) and 350m style (post-LN, no final LN,
``word_embed_proj_dim != hidden_size`` with project_in/out). Padded batches are left-padded; both
sides get the same explicit positions (``cumsum(mask) - 1`` clipped at 0) and logits are compared
on real tokens only.
"""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.peft import get_merged_lora_ckpt
from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

from distillm_tune.models import LoRASettings, family_for
from distillm_tune.models.modules import PostNormSelfAttentionLayer
from distillm_tune.models.opt import FAMILY, lora_opt_125m, opt_125m, opt_1_3b, opt_2_7b, opt_350m

ATOL = 1e-5
VOCAB = 103
CONFIGS = {
    "pre_ln": dict(do_layer_norm_before=True, word_embed_proj_dim=32),
    "post_ln_proj": dict(do_layer_norm_before=False, word_embed_proj_dim=16),  # opt-350m style
}


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


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config(request):
    # init_std 0.2: logits of order 1 (std ~1), so a 1e-5 tolerance means something
    return OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=48, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64, init_std=0.2, **CONFIGS[request.param])


@pytest.fixture(scope="module")
def hf_model(config):
    torch.manual_seed(0)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("opt")
    hf_model.save_pretrained(path)  # transformers-5 key form (model.decoder.*), safetensors
    return path


def load_tune(config, state_dict, lora=None):
    model = FAMILY.build(config.to_dict(), lora).eval()
    model.load_state_dict(FAMILY.hf_to_tune(state_dict, config.to_dict()), strict=lora is None)
    return model


@pytest.fixture(scope="module")
def tune_model(config, saved_dir):
    return load_tune(config, load_file(os.path.join(saved_dir, "model.safetensors")))


def test_registry_sizes_and_real_vocab():
    assert family_for("opt") is FAMILY
    with torch.device("meta"):
        counts = [sum(p.numel() for p in f().parameters()) for f in (opt_125m, opt_350m, opt_1_3b, opt_2_7b)]
        assert isinstance(opt_350m().layers[0], PostNormSelfAttentionLayer)
        assert opt_2_7b().head_dim == 80
        lora_opt_125m(["q_proj", "v_proj"], apply_lora_to_mlp=True)
    # transformers' parameter counts for facebook/opt-125m / -350m / -1.3b / -2.7b (tied head once)
    assert counts == [125239296, 331196416, 1315758080, 2651596800]
    assert FAMILY.real_vocab_size({"vocab_size": 50272}) == 50265
    assert FAMILY.real_vocab_size({"vocab_size": VOCAB}) == VOCAB


def test_architecture_variant(config, tune_model):
    post = not config.do_layer_norm_before
    assert isinstance(tune_model.layers[0], PostNormSelfAttentionLayer) == post
    assert isinstance(tune_model.norm, torch.nn.Identity) == post
    assert (tune_model.project_in is not None) == (config.word_embed_proj_dim != config.hidden_size)


def test_logits_match_hf_on_left_padded_batch(config, hf_model, tune_model):
    tokens, real, pos, mask = padded_batch()
    diff = max_diff(tune_logits(tune_model, tokens, real, pos, mask), hf_logits(hf_model, tokens, real, pos), real)
    print(f"opt {'pre' if config.do_layer_norm_before else 'post'}-LN padded-batch max |logit diff| = {diff:.3g}")
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
    print(f"opt kv-cache vs full max |logit diff| = {diff:.3g}")
    assert diff < ATOL
    assert max_diff(full, hf_logits(hf_model, tokens, real, pos), real) < ATOL


def test_torchtune_generate_matches_transformers_greedy(config, hf_model, saved_dir):
    """torchtune's batched, left-padded, KV-cached ``generate`` (greedy) gives transformers'
    ``generate`` tokens: positions from ``input_pos`` of shape [b] per step are right."""
    from torchtune.generation import generate

    pad = 1
    prompt = torch.randint(3, VOCAB - 2, (3, 6), generator=torch.Generator().manual_seed(2))
    prompt[1, :2] = pad
    prompt[2, :4] = pad
    model = load_tune(config, load_file(os.path.join(saved_dir, "model.safetensors")))
    model.setup_caches(batch_size=3, dtype=torch.float32, decoder_max_seq_len=6 + 8)
    ours, _ = generate(model, prompt, max_generated_tokens=8, pad_id=pad, top_k=1)
    theirs = hf_model.generate(prompt, attention_mask=(prompt != pad).long(), max_new_tokens=8,
                               do_sample=False, pad_token_id=pad, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_hub_key_form_loads(config, hf_model, tune_model):
    """Hub files: ``decoder.*`` keys and a (tied) ``lm_head.weight``."""
    hub = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    assert "lm_head.weight" in hub and "decoder.embed_tokens.weight" in hub
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
    loaded, info = OPTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    tokens, real, pos, _ = padded_batch()
    assert max_diff(hf_logits(loaded.eval(), tokens, real, pos), hf_logits(hf_model, tokens, real, pos), real) == 0


def peft_without_torchao(monkeypatch):
    """peft >= 0.18.1 raises ImportError in plain-LoRA injection when torchao < 0.16 is installed
    (``dispatch_torchao`` -> ``is_torchao_available``); torchtune 0.6.1 needs torchao <= 0.14.
    The adapters here are not torchao-quantized, so tell that one dispatcher torchao is absent."""
    import peft.tuners.lora.torchao as peft_torchao

    monkeypatch.setattr(peft_torchao, "is_torchao_available", lambda: False)


def test_lora_merge_and_peft_export(config, saved_dir, tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel

    peft_without_torchao(monkeypatch)
    lora = LoRASettings(("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
    base_sd = load_file(os.path.join(saved_dir, "model.safetensors"))
    model = load_tune(config, base_sd, lora)
    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert lora_sd and set(model.state_dict()) - set(lora_sd) == set(FAMILY.hf_to_tune(base_sd, config.to_dict()))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.2)
    tokens, real, pos, mask = padded_batch()
    lora_logits = tune_logits(model, tokens, real, pos, mask)

    merged = get_merged_lora_ckpt({k: v.clone() for k, v in model.state_dict().items()},
                                  rank=lora.lora_rank, alpha=lora.lora_alpha)
    merged_hf = OPTForCausalLM(config).eval()
    merged_hf.load_state_dict(FAMILY.tune_to_hf(merged, config.to_dict()), strict=False)
    merged_diff = max_diff(hf_logits(merged_hf, tokens, real, pos), lora_logits, real)

    peft_sd, targets, extra = FAMILY.lora_to_peft(model.state_dict(), config.to_dict(), lora)
    assert sorted(targets) == ["fc1", "fc2", "out_proj", "q_proj", "v_proj"] and extra == {}
    LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha, lora_dropout=0.0, target_modules=targets,
               **extra).save_pretrained(tmp_path)
    save_file(peft_sd, os.path.join(tmp_path, "adapter_model.safetensors"))
    base_hf = OPTForCausalLM.from_pretrained(saved_dir).eval()
    base_logits = hf_logits(base_hf, tokens, real, pos)  # PEFT wraps base_hf in place below
    peft_model = PeftModel.from_pretrained(base_hf, tmp_path).eval()
    names = set(peft_model.state_dict())
    for key in peft_sd:
        assert key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.") in names, key
    peft_diff = max_diff(hf_logits(peft_model, tokens, real, pos), lora_logits, real)
    print(f"opt lora merged diff = {merged_diff:.3g}, peft diff = {peft_diff:.3g}")
    assert merged_diff < ATOL and peft_diff < ATOL
    assert max_diff(base_logits, lora_logits, real) > 1e-3  # the adapters really change the output


def test_lora_rejects_tied_output():
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        with torch.device("meta"):
            lora_opt_125m(["q_proj"], apply_lora_to_output=True)


def test_mismatched_config_names_key_and_shapes(config, hf_model):
    bad = config.to_dict() | {"ffn_dim": 40}
    with pytest.raises(ValueError, match=r"layers\.0\.fc1\.weight: checkpoint shape \(48, 32\) but the config implies \(40, 32\)"):
        FAMILY.hf_to_tune(hf_model.state_dict(), bad)


def test_unexpected_and_missing_keys_are_named(config, hf_model):
    sd = dict(hf_model.state_dict())
    sd["model.decoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    del sd["model.decoder.layers.1.fc2.bias"]
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.0\.self_attn\.rotary\.weight'\].*missing keys \['layers\.1\.fc2\.bias'\]"):
        FAMILY.hf_to_tune(sd, config.to_dict())


@pytest.mark.parametrize("key,value,match", [
    ("enable_bias", False, "enable_bias"),
    ("activation_function", "swish", "activation_function 'swish'"),
    ("layerdrop", 0.1, "layerdrop"),
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
    "special </s> inside</s> and <pad> and <s>",
    "</s>",
    "unicode é 日本 and emoji 🙂",
    "digits 4242 and 's contractions",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """OPT's hub layout: vocab.json + merges.txt with <s> <pad> </s> <unk> as ids 0-3, and the
    tokenizer_config.json / special_tokens_map.json of facebook/opt-* (</s> is BOS, EOS and UNK)."""
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("opt_tok")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(training_text(), vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    tok.save_model(str(path))
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    (path / "tokenizer_config.json").write_text(json.dumps({
        **special, "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True,
        "add_prefix_space": False, "errors": "replace"}))
    return path


def test_tokenizer_ids_match_transformers(tokenizer_dir, tmp_path):
    reference = GPT2Tokenizer.from_pretrained(tokenizer_dir)
    assert reference("x")["input_ids"][0] == 2  # transformers prepends </s>
    reference.save_pretrained(tmp_path)  # the tokenizer.json form transformers-5 writes
    assert (tmp_path / "tokenizer.json").exists()
    for path in (tokenizer_dir, tmp_path):
        tok = FAMILY.load_tokenizer(str(path), 64)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 2, 1)
        assert tok.vocab_size == len(reference)
        for text in TEXTS:
            ids = reference(text)["input_ids"]
            assert tok.encode(text) == ids, (path, text)
            assert tok.encode(text, add_bos=False, add_eos=True) == ids[1:] + [2]
            assert tok.decode(ids) == reference.decode(ids)
            assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
