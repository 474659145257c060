"""GPT-2 port against transformers' own GPT2LMHeadModel / GPT2Tokenizer (tiny, random, fp32, offline).

The parity checks it shares with test_opt.py are in decoder_parity.py.
"""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from distillm_tune.models import LoRASettings, family_for
from distillm_tune.models.gpt2 import FAMILY

from decoder_parity import DecoderPort, byte_level_bpe, tokenizer_texts  # this folder: pytest puts it on sys.path

VOCAB = 101
PORT = DecoderPort("gpt2", FAMILY, GPT2LMHeadModel, VOCAB, norm_name="ln")


@pytest.fixture(scope="module")
def config():
    # initializer_range 0.2: logits of order 1 (std ~1), so a 1e-5 tolerance means something
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                      initializer_range=0.2, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


@pytest.fixture(scope="module")
def hf_model(config):
    return PORT.random_hf_model(config)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(path)  # transformers-5 key form, safetensors
    return path


@pytest.fixture(scope="module")
def tune_model(config, saved_dir):
    return PORT.load_saved(config, saved_dir)


def test_registry_and_sizes():
    assert family_for("gpt2") is FAMILY
    sizes = [(12, 768, 12), (24, 1024, 16), (36, 1280, 20), (48, 1600, 25)]  # the hub config.json values
    with torch.device("meta"):
        counts = [sum(p.numel() for p in FAMILY.build(GPT2Config(n_layer=n, n_embd=d, n_head=h).to_dict()).parameters())
                  for n, d, h in sizes]
        FAMILY.build(GPT2Config().to_dict(), LoRASettings(("q_proj", "v_proj")))
    # transformers' parameter counts for gpt2 / -medium / -large / -xl (tied head counted once)
    assert counts == [124439808, 354823168, 774030080, 1557611200]


def test_logits_match_hf_on_left_padded_batch(hf_model, tune_model):
    PORT.check_logits_match_hf(hf_model, tune_model, "gpt2")


def test_kv_cache_decoding_matches_full_forward(config, hf_model, saved_dir, tune_model):
    PORT.check_kv_cache_decoding(config, hf_model, saved_dir, tune_model)


def test_torchtune_generate_matches_transformers_greedy(config, hf_model, saved_dir):
    PORT.check_generate_matches_greedy(config, hf_model, saved_dir, pad=VOCAB - 1)


def test_hub_key_form_with_buffers_loads(config, hf_model, tune_model):
    """Hub files: no ``transformer.`` prefix, attn.bias / attn.masked_bias buffers, lm_head."""
    n = config.n_positions
    hub = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    for i in range(config.n_layer):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model = PORT.load(config, hub)  # strict=True
    for key, value in tune_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_tune_to_hf_loads_into_transformers(config, hf_model, tune_model, tmp_path):
    PORT.check_tune_to_hf_loads_into_transformers(config, hf_model, tune_model, tmp_path)


LORA_CASES = [
    LoRASettings(("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0),
    LoRASettings(("q_proj", "k_proj", "v_proj"), lora_rank=2, lora_alpha=3.0),
    LoRASettings(("k_proj",), lora_rank=3, lora_alpha=5.0),
]


@pytest.mark.usefixtures("peft_without_torchao")
@pytest.mark.parametrize("lora", LORA_CASES, ids=["qv_o_mlp", "qkv", "k"])
def test_lora_merge_and_peft_export(config, saved_dir, lora, tmp_path):
    PORT.check_lora_merge_and_peft_export(config, saved_dir, lora, tmp_path)


def test_lora_rejects_tied_output():
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        with torch.device("meta"):
            FAMILY.build(GPT2Config().to_dict(), LoRASettings(("q_proj",), apply_lora_to_output=True))


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


TEXTS = tokenizer_texts("special <|endoftext|> inside<|endoftext|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_tok")
    tok = byte_level_bpe(["<|endoftext|>"])
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
