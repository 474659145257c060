"""T5 v1.1 / mT5 port against transformers 5 (offline: tiny random models, a tokenizer trained here).

Reference values come from transformers' own ``T5ForConditionalGeneration`` /
``MT5ForConditionalGeneration``, ``T5Tokenizer`` and ``peft``; fp32 throughout.
"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune.modules.common_utils import local_kv_cache
from torchtune.modules.peft import get_merged_lora_ckpt
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from distillm_tune.models import LoRASettings, family_for
from distillm_tune.generation import sample_next_token
from distillm_tune.models import t5 as t5_port

VOCAB, D_MODEL = 133, 32
# heads * d_kv = 48 != d_model 32; 2 encoder / 3 decoder layers.
SHAPE = dict(vocab_size=VOCAB, d_model=D_MODEL, d_kv=16, d_ff=40, num_layers=2, num_decoder_layers=3,
             num_heads=3, dropout_rate=0.0)
KINDS = {
    # small bucket settings so a 30-token batch reaches the log-spaced and clamped buckets
    "t5_v1_1": (T5Config, T5ForConditionalGeneration,
                dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20)),
    "mt5": (MT5Config, MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "t5_v1_0": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="relu")),  # tied + scaled head
}


def _hf_checkpoint(kind, path, seed=0):
    """A tiny random HF model saved with ``save_pretrained``; v1.1/mT5 get their own lm_head."""
    torch.manual_seed(seed)
    config_cls, model_cls, extra = KINDS[kind]
    hf = model_cls(config_cls(**SHAPE, **extra)).eval()
    if kind != "t5_v1_0":
        hf.lm_head.weight = nn.Parameter(torch.randn(VOCAB, D_MODEL))
    hf.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    return hf, config, load_file(str(path / "model.safetensors"))


def _port(config, state_dict, lora=None):
    family = family_for(config["model_type"])
    model = family.build(config, lora)
    missing, unexpected = model.load_state_dict(family.hf_to_tune(state_dict, config), strict=lora is None)
    assert not unexpected and all(".lora_" in k for k in missing)
    return model.eval()


def _batch(batch=3, src=30, tgt=25, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, src), generator=g)
    mask = torch.ones(batch, src, dtype=torch.bool)
    mask[1, 21:] = False
    mask[2, 6:] = False
    input_ids[~mask] = 0
    return input_ids, mask, torch.randint(0, VOCAB, (batch, tgt), generator=g)


def _hf_logits(hf, input_ids, mask, decoder_input_ids):
    return hf(input_ids=input_ids, attention_mask=mask.long(), decoder_input_ids=decoder_input_ids).logits


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_logits_and_round_trip_match_transformers(kind, tmp_path):
    hf, config, hf_sd = _hf_checkpoint(kind, tmp_path / "hf")
    model = _port(config, hf_sd)
    assert (model.output is None) == (kind == "t5_v1_0")
    input_ids, mask, dec = _batch()
    ref = _hf_logits(hf, input_ids, mask, dec)
    logits = model(input_ids, dec, encoder_padding_mask=mask)
    enc_diff = (model.encode(input_ids, mask) - hf.encoder(input_ids=input_ids, attention_mask=mask.long())
                .last_hidden_state).abs().max().item()
    diff = (logits - ref).abs().max().item()
    print(f"{kind}: max|logit diff| {diff:.2e} (max|logit| {ref.abs().max():.1f}), encoder {enc_diff:.2e}")
    assert diff < 1e-4 and enc_diff < 1e-5

    # tune -> HF: save as safetensors next to the config; transformers loads it with nothing missing
    out = tmp_path / "export"
    out.mkdir()
    save_file(family_for(config["model_type"]).tune_to_hf(model.state_dict(), config), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    hf2, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    round_trip = (_hf_logits(hf2.eval(), input_ids, mask, dec) - ref).abs().max().item()
    print(f"{kind}: HF -> tune -> HF max|logit diff| {round_trip:.1e}")
    assert round_trip == 0.0


@torch.no_grad()
def test_cached_decode_equals_full_forward(tmp_path):
    _, config, hf_sd = _hf_checkpoint("t5_v1_1", tmp_path)
    model = _port(config, hf_sd)
    input_ids, mask, dec = _batch(tgt=12)
    full = model(input_ids, dec, mask)
    with local_kv_cache(model, batch_size=3, device=torch.device("cpu"), dtype=torch.float32,
                        encoder_max_seq_len=input_ids.shape[1], decoder_max_seq_len=dec.shape[1]):
        enc = model.encode(input_ids, mask)
        steps = [model.decode(dec[:, :4], enc, mask)]  # multi-token first step fills cross K/V
        cross_k = model.decoder.layers[0].cross_attn.kv_cache.k_cache.clone()
        steps += [model.decode(dec[:, t : t + 1], enc, mask) for t in range(4, dec.shape[1])]
        assert torch.equal(cross_k, model.decoder.layers[0].cross_attn.kv_cache.k_cache)  # filled once
        assert model.decoder.layers[0].attn.kv_cache.size == dec.shape[1]
    assert not model.caches_are_setup()
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"cached vs full decoder max|logit diff| {diff:.1e} (max|logit| {full.abs().max():.1f})")
    assert diff < 1e-4


@pytest.mark.parametrize("kind", ["t5_v1_1", "mt5"])
@torch.no_grad()
def test_greedy_generate_equals_transformers(kind, tmp_path):
    hf, config, hf_sd = _hf_checkpoint(kind, tmp_path, seed=3)
    model = _port(config, hf_sd).train()
    input_ids, mask, _ = _batch(seed=4)
    ours = t5_port.generate_seq2seq(model, input_ids, mask, max_new_tokens=12, temperature=0.0)
    assert model.training and not model.caches_are_setup()
    # transformers sizes its default cache by the *encoder* depth (breaks when the decoder is
    # deeper), so hand it a growing one.
    ref = hf.generate(input_ids=input_ids, attention_mask=mask.long(), do_sample=False, num_beams=1,
                      max_new_tokens=12, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                      cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    print(kind, ours.tolist())
    assert torch.equal(ours, ref[:, 1:])
    # EOS early in one row: that row is padded with 0, the others go on; HF agrees.
    eos = int(ours[0, 2])
    ours = t5_port.generate_seq2seq(model, input_ids, mask, max_new_tokens=12, eos_id=eos, greedy=True)
    ref = hf.generate(input_ids=input_ids, attention_mask=mask.long(), do_sample=False, num_beams=1,
                      max_new_tokens=12, decoder_start_token_id=0, eos_token_id=eos, pad_token_id=0,
                      cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    assert (ours[0, 3:] == 0).all() and torch.equal(ours, ref[:, 1:])


@torch.no_grad()
def test_sampling_options(tmp_path):
    _, config, hf_sd = _hf_checkpoint("t5_v1_1", tmp_path)
    model = _port(config, hf_sd)
    input_ids, mask, _ = _batch()
    greedy = t5_port.generate_seq2seq(model, input_ids, mask, max_new_tokens=6, greedy=True)
    top1 = t5_port.generate_seq2seq(model, input_ids, mask, max_new_tokens=6, temperature=0.7, top_k=1)
    assert torch.equal(greedy, top1)

    def sample(seed, **kw):
        return t5_port.generate_seq2seq(model, input_ids, mask, max_new_tokens=6, temperature=1.3,
                                        generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0, top_p=0.9), sample(0, top_p=0.9))
    # top_p keeps the smallest set reaching p: a tiny p leaves only the argmax
    assert torch.equal(sample(1, top_p=1e-6), greedy)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    picks = {int(sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(s)))
             for s in range(40)}
    assert picks == {0, 1}


@torch.no_grad()
def test_lora_merged_export_and_peft_adapter(tmp_path, request):
    peft = pytest.importorskip("peft")
    request.getfixturevalue("peft_without_torchao")  # tests/conftest.py; after the skip check
    hf, config, hf_sd = _hf_checkpoint("t5_v1_1", tmp_path / "hf")
    lora = LoRASettings(lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True,
                        apply_lora_to_output=True, lora_rank=4, lora_alpha=8.0)
    model = _port(config, hf_sd, lora)
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.normal_(std=0.05)  # nonzero lora_b, so the adapters change the logits (larger: ill-conditioned fp32)
    input_ids, mask, dec = _batch()
    logits = model(input_ids, dec, mask)
    assert (logits - _hf_logits(hf, input_ids, mask, dec)).abs().max() > 1e-2
    family = family_for("t5")

    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = get_merged_lora_ckpt(state, rank=lora.lora_rank, alpha=lora.lora_alpha)
    merged_hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    result = merged_hf.load_state_dict(family.tune_to_hf(merged, config), strict=False)
    # only the embedding aliases of ``shared`` are absent (transformers-5 save_pretrained form)
    assert sorted(result.missing_keys) == ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight"]
    assert not result.unexpected_keys
    merged_diff = (_hf_logits(merged_hf, input_ids, mask, dec) - logits).abs().max().item()

    lora_sd = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    peft_sd, targets = family.lora_to_peft(lora_sd, config, lora)
    assert targets == ["k", "lm_head", "o", "q", "v", "wi_0", "wi_1", "wo"]
    assert "base_model.model.decoder.block.2.layer.1.EncDecAttention.o.lora_B.weight" in peft_sd
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(peft_sd, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="SEQ_2_SEQ_LM", r=lora.lora_rank, lora_alpha=lora.lora_alpha,
        lora_dropout=0.0, target_modules=targets, bias="none")))
    base = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    peft_diff = (_hf_logits(peft_model, input_ids, mask, dec) - logits).abs().max().item()
    print(f"LoRA merged export {merged_diff:.1e}, PEFT adapter {peft_diff:.1e} (max|logit| {logits.abs().max():.1f})")
    assert merged_diff < 1e-4 and peft_diff < 1e-4
    with pytest.raises(ValueError, match="lora_a"):
        family.tune_to_hf(model.state_dict(), config)


def test_tokenizer_ids_match_transformers(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5Tokenizer as HFT5Tokenizer

    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "men", "sa", "lo", "pur", "de", "ni", "ex", "qua", "zo", "tha", "ing"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(120)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?", ","])
             for _ in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spiece"), vocab_size=100,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    # transformers 5's T5Tokenizer(vocab_file=...) ignores the file; from_pretrained converts it.
    hf = HFT5Tokenizer.from_pretrained(str(tmp_path), extra_ids=100)
    ours = family_for("mt5").load_tokenizer(str(tmp_path))
    assert (ours.vocab_size, ours.pad_id, ours.eos_id, ours.bos_id) == (len(hf), hf.pad_token_id, hf.eos_token_id, None)
    assert ours.encode("<extra_id_0> <extra_id_99>", add_eos=False) == [199, 100]
    texts = lines[:40] + [
        "", " ", "  leading and trailing  ", "tabs\tand\nnewlines", "Unknown: Zebra ü 你好 ①",
        "kato <extra_id_0> rimen<extra_id_17>.", "a</s>b <pad> c <unk>", "<extra_id_100> <extra_id_5",
    ]
    for text in texts:
        ids = ours.encode(text, add_bos=False, add_eos=True)
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text, add_eos=False) == hf(text, add_special_tokens=False)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    ids = [0, 5, 2, 99, 100, 199, 1, 0, 205]  # 205: a padded embedding row, dropped like HF
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    short = family_for("t5").load_tokenizer(str(tmp_path), max_seq_len=6)
    assert short.encode(lines[0]) == hf(lines[0], truncation=True, max_length=6)["input_ids"]


def test_bad_configs_raise_value_error(tmp_path):
    _, config, hf_sd = _hf_checkpoint("t5_v1_1", tmp_path)
    key = r"encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight"
    with pytest.raises(ValueError, match=key + r".*\(40, 32\).*\(64, 32\)"):
        t5_port.hf_to_tune(hf_sd, dict(config, d_ff=64))
    with pytest.raises(ValueError, match=r"'tok_embeddings\.weight' has shape \(133, 32\), config implies \(140, 32\)"):
        t5_port.tune_to_hf(_port(config, hf_sd).state_dict(), dict(config, vocab_size=140))
    with pytest.raises(ValueError, match=r"lm_head.weight' differs from 'shared.weight"):
        t5_port.hf_to_tune(hf_sd, dict(config, scale_decoder_outputs=True))  # v1.1 weights, v1.0 config
    with pytest.raises(ValueError, match=r"missing \['decoder\.block\.0\.layer\.2\.DenseReluDense\.wi\.weight"):
        t5_port.hf_to_tune(hf_sd, dict(config, feed_forward_proj="relu", scale_decoder_outputs=False))
    with pytest.raises(ValueError, match=r"missing \['decoder\.block\.2\."):
        t5_port.hf_to_tune({k: v for k, v in hf_sd.items() if not k.startswith("decoder.block.2.")}, config)
    with pytest.raises(ValueError, match="unexpected.*decoder.block.2"):
        t5_port.hf_to_tune(hf_sd, dict(config, num_decoder_layers=2))
    with pytest.raises(ValueError, match="gated-silu"):
        t5_port.build(dict(config, feed_forward_proj="gated-silu"))
    with pytest.raises(ValueError, match=r"\['num_heads'\]"):
        t5_port.build({k: v for k, v in config.items() if k != "num_heads"})
    with pytest.raises(ValueError, match="wo"):
        t5_port.build(config, LoRASettings(lora_attn_modules=("wo",)))


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_paper_sizes_match_transformers_shapes(family):
    config_cls, model_cls = KINDS["t5_v1_1" if family == "t5" else "mt5"][:2]
    sizes = {"small": (8, 512, 6, 1024), "base": (12, 768, 12, 2048), "large": (24, 1024, 16, 2816),
             "xl": (24, 2048, 32, 5120)}
    for size, (layers, d, heads, d_ff) in sizes.items():
        config = config_cls(vocab_size=32128 if family == "t5" else 250112, d_model=d, d_kv=64, d_ff=d_ff,
                            num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False).to_dict()
        with torch.device("meta"):
            ours = t5_port.build(config).state_dict()
            lora = t5_port.build(config, LoRASettings(("q_proj", "v_proj"), lora_rank=8)).state_dict()
            hf = model_cls(config_cls(**config)).state_dict() if size in ("small", "xl") else None
        expected = {t: s for _, (t, s) in t5_port.key_map(config).items()}
        assert {k: tuple(v.shape) for k, v in ours.items()} == expected, size
        assert set(lora) - set(ours) and all(".lora_" in k for k in set(lora) - set(ours))
        if hf is not None:  # the table itself agrees with transformers' modules
            converted = t5_port.hf_to_tune(hf, config)
            assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert t5_port.real_vocab_size(config) == (32100 if family == "t5" else 250100)
