"""OPT port against transformers' own OPTForCausalLM / OPT tokenizer (tiny, random, fp32, offline).

Two architectures: pre-LN (125m/1.3b/2.7b style) and 350m style (post-LN, no final LN,
``word_embed_proj_dim != hidden_size`` with project_in/out). The parity checks it shares with
test_gpt2.py are in decoder_parity.py.
"""

import json

import pytest
import torch
from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

from distillm_tune.models import LoRASettings, family_for
from distillm_tune.models.modules import PostNormSelfAttentionLayer
from distillm_tune.models.opt import FAMILY

from decoder_parity import DecoderPort, byte_level_bpe, tokenizer_texts  # this folder: pytest puts it on sys.path

VOCAB = 103
PORT = DecoderPort("opt", FAMILY, OPTForCausalLM, VOCAB, norm_name="layer_norm")
CONFIGS = {
    "pre_ln": dict(do_layer_norm_before=True, word_embed_proj_dim=32),
    "post_ln_proj": dict(do_layer_norm_before=False, word_embed_proj_dim=16),  # opt-350m style
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config(request):
    # init_std 0.2: logits of order 1 (std ~1), so a 1e-5 tolerance means something
    return OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=48, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64, init_std=0.2, **CONFIGS[request.param])


@pytest.fixture(scope="module")
def hf_model(config):
    return PORT.random_hf_model(config)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("opt")
    hf_model.save_pretrained(path)  # transformers-5 key form (model.decoder.*), safetensors
    return path


@pytest.fixture(scope="module")
def tune_model(config, saved_dir):
    return PORT.load_saved(config, saved_dir)


def test_registry_sizes_and_real_vocab():
    assert family_for("opt") is FAMILY
    # the hub config.json values: layers, dim, heads, ffn, word_embed_proj_dim, pre-LN
    sizes = [(12, 768, 12, 3072, 768, True), (24, 1024, 16, 4096, 512, False), (24, 2048, 32, 8192, 2048, True),
             (32, 2560, 32, 10240, 2560, True)]
    configs = [OPTConfig(num_hidden_layers=n, hidden_size=d, num_attention_heads=h, ffn_dim=f, word_embed_proj_dim=w,
                         do_layer_norm_before=pre, vocab_size=50272, max_position_embeddings=2048).to_dict()
               for n, d, h, f, w, pre in sizes]
    with torch.device("meta"):
        models = [FAMILY.build(c) for c in configs]
        counts = [sum(p.numel() for p in m.parameters()) for m in models]
        assert isinstance(models[1].layers[0], PostNormSelfAttentionLayer)
        assert models[3].head_dim == 80
        FAMILY.build(configs[0], LoRASettings(("q_proj", "v_proj"), apply_lora_to_mlp=True))
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
    PORT.check_logits_match_hf(hf_model, tune_model, f"opt {'pre' if config.do_layer_norm_before else 'post'}-LN")


def test_kv_cache_decoding_matches_full_forward(config, hf_model, saved_dir, tune_model):
    PORT.check_kv_cache_decoding(config, hf_model, saved_dir, tune_model)


def test_torchtune_generate_matches_transformers_greedy(config, hf_model, saved_dir):
    PORT.check_generate_matches_greedy(config, hf_model, saved_dir, pad=1)


def test_hub_key_form_loads(config, hf_model, tune_model):
    """Hub files: ``decoder.*`` keys and a (tied) ``lm_head.weight``."""
    hub = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    assert "lm_head.weight" in hub and "decoder.embed_tokens.weight" in hub
    model = PORT.load(config, hub)  # strict=True
    for key, value in tune_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_tune_to_hf_loads_into_transformers(config, hf_model, tune_model, tmp_path):
    PORT.check_tune_to_hf_loads_into_transformers(config, hf_model, tune_model, tmp_path)


@pytest.mark.usefixtures("peft_without_torchao")
def test_lora_merge_and_peft_export(config, saved_dir, tmp_path):
    lora = LoRASettings(("q_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
    _, targets, extra = PORT.check_lora_merge_and_peft_export(config, saved_dir, lora, tmp_path)
    assert sorted(targets) == ["fc1", "fc2", "out_proj", "q_proj", "v_proj"] and extra == {}


def test_lora_rejects_tied_output():
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        with torch.device("meta"):
            FAMILY.build(OPTConfig().to_dict(), LoRASettings(("q_proj",), apply_lora_to_output=True))


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


TEXTS = tokenizer_texts("special </s> inside</s> and <pad> and <s>", "</s>")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """OPT's hub layout: vocab.json + merges.txt with <s> <pad> </s> <unk> as ids 0-3, and the
    tokenizer_config.json / special_tokens_map.json of facebook/opt-* (</s> is BOS, EOS and UNK)."""
    path = tmp_path_factory.mktemp("opt_tok")
    tok = byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
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
