"""The checks test_gpt2.py and test_opt.py share: a learned-position, tied-head port against the
transformers model it mirrors (tiny, random, fp32, offline).

Padded batches are left-padded; both sides get the same explicit positions (``cumsum(mask) - 1``
clipped at 0) and logits are compared on real tokens only (pad rows attend to nothing real).
"""

import os
import random

import torch
from safetensors.torch import load_file, save_file
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.peft import get_merged_lora_ckpt

ATOL = 1e-5


def hf_logits(model, tokens, real, pos):
    with torch.no_grad():
        return model(tokens, attention_mask=real.long(), position_ids=pos.long()).logits


def tune_logits(model, tokens, real, pos, mask):
    with torch.no_grad():
        return model(tokens, mask=mask, input_pos=pos)


def max_diff(a, b, real):
    return (a - b)[real].abs().max().item()


def training_text(n=300, seed=0):
    rng = random.Random(seed)
    pieces = ["ka", "to", "ri", "men", "zu", "ly", "the", "and", "ing", "é", "日本", "  ", "\n", "42", "!", "'s"]
    return [" ".join("".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
                     for _ in range(rng.randint(3, 12))) for _ in range(n)]


def byte_level_bpe(special_tokens):
    """A byte-level BPE (``tokenizers``) of 400 ids trained on :func:`training_text`; the special
    tokens come first."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(training_text(), vocab_size=400, min_frequency=2,
                            special_tokens=special_tokens, show_progress=False)
    return tok


def tokenizer_texts(*special_lines):
    """Texts the tokenizer tests compare on; ``special_lines`` hold the family's special tokens."""
    return ["the kato riming", " leading space", "   three spaces and trailing  ", "line\nbreak\n\n",
            *special_lines, "unicode é 日本 and emoji 🙂", "digits 4242 and 's contractions", ""]


class DecoderPort:
    """One ported family (``family``: its registry entry), the transformers class it mirrors
    (``hf_cls``), the tiny vocabulary of the tests and the name of its LayerNorm parameters."""

    def __init__(self, name, family, hf_cls, vocab, norm_name):
        self.name, self.family, self.hf_cls, self.vocab, self.norm_name = name, family, hf_cls, vocab, norm_name

    def padded_batch(self, batch=3, seq=10, pads=(0, 3, 8), seed=0):
        """Left-padded tokens, boolean padding mask, positions and the [B, S, S] causal+padding mask."""
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab, (batch, seq), generator=g)
        real = torch.ones(batch, seq, dtype=torch.bool)
        for row, n in enumerate(pads):
            real[row, :n] = False
        pos = get_position_ids_from_padding_mask(real)
        return tokens, real, pos, get_causal_mask_from_padding_mask(real)

    def random_hf_model(self, config):
        torch.manual_seed(0)
        model = self.hf_cls(config).eval()
        with torch.no_grad():  # non-trivial LayerNorm affine parameters
            for name, p in model.named_parameters():
                if self.norm_name in name:
                    p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
        return model

    def load(self, config, state_dict, lora=None):
        model = self.family.build(config.to_dict(), lora).eval()
        model.load_state_dict(self.family.hf_to_tune(state_dict, config.to_dict()), strict=lora is None)
        return model

    def load_saved(self, config, saved_dir, lora=None):
        return self.load(config, load_file(os.path.join(saved_dir, "model.safetensors")), lora)

    def check_logits_match_hf(self, hf_model, tune_model, label):
        tokens, real, pos, mask = self.padded_batch()
        diff = max_diff(tune_logits(tune_model, tokens, real, pos, mask), hf_logits(hf_model, tokens, real, pos), real)
        print(f"{label} padded-batch max |logit diff| = {diff:.3g}")
        assert diff < ATOL
        # No positions or mask given: arange positions and the causal default on both sides.
        with torch.no_grad():
            diff = (tune_model(tokens) - hf_model(tokens).logits).abs().max().item()
        assert diff < ATOL

    def check_kv_cache_decoding(self, config, hf_model, saved_dir, tune_model):
        prompt_len, total = 6, 11
        tokens, real, pos, mask = self.padded_batch(seq=total, pads=(0, 2, 5), seed=1)
        full = tune_logits(tune_model, tokens, real, pos, mask)
        model = self.load_saved(config, saved_dir)
        model.setup_caches(batch_size=3, dtype=torch.float32, decoder_max_seq_len=total)
        with torch.no_grad():
            steps = [model(tokens[:, :prompt_len], mask=mask[:, :prompt_len], input_pos=pos[:, :prompt_len])]
            for t in range(prompt_len, total):  # input_pos [b]: one position per sequence, as generate() passes
                steps.append(model(tokens[:, t:t + 1], mask=mask[:, t:t + 1], input_pos=pos[:, t]))
        diff = max_diff(torch.cat(steps, dim=1), full, real)
        print(f"{self.name} kv-cache vs full max |logit diff| = {diff:.3g}")
        assert diff < ATOL
        assert max_diff(full, hf_logits(hf_model, tokens, real, pos), real) < ATOL

    def check_generate_matches_greedy(self, config, hf_model, saved_dir, pad):
        """torchtune's batched, left-padded, KV-cached ``generate`` (greedy) gives transformers'
        ``generate`` tokens: positions from ``input_pos`` of shape [b] per step are right."""
        from torchtune.generation import generate

        prompt = torch.randint(3, self.vocab - 2, (3, 6), generator=torch.Generator().manual_seed(2))
        prompt[1, :2] = pad
        prompt[2, :4] = pad
        model = self.load_saved(config, saved_dir)
        model.setup_caches(batch_size=3, dtype=torch.float32, decoder_max_seq_len=6 + 8)
        ours, _ = generate(model, prompt, max_generated_tokens=8, pad_id=pad, top_k=1)
        theirs = hf_model.generate(prompt, attention_mask=(prompt != pad).long(), max_new_tokens=8,
                                   do_sample=False, pad_token_id=pad, eos_token_id=None)
        assert torch.equal(ours, theirs)  # token ids: exact

    def check_tune_to_hf_loads_into_transformers(self, config, hf_model, tune_model, tmp_path):
        exported = self.family.tune_to_hf(tune_model.state_dict(), config.to_dict())
        reference = hf_model.state_dict()
        for key, value in exported.items():
            assert torch.equal(value, reference[key]), key  # renamed/reshaped copies, no arithmetic: exact
        config.save_pretrained(tmp_path)
        save_file(exported, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
        loaded, info = self.hf_cls.from_pretrained(tmp_path, output_loading_info=True)
        assert all(not v for v in info.values()), info
        tokens, real, pos, _ = self.padded_batch()
        assert max_diff(hf_logits(loaded.eval(), tokens, real, pos), hf_logits(hf_model, tokens, real, pos), real) == 0

    def check_lora_merge_and_peft_export(self, config, saved_dir, lora, tmp_path):
        """Random adapters: the merged export and the PEFT adapter on the HF base both give the
        LoRA model's logits. Needs the ``peft_without_torchao`` fixture. Returns
        ``lora_to_peft``'s ``(peft_state_dict, target_modules, extra_config)``."""
        from peft import LoraConfig, PeftModel

        base_sd = load_file(os.path.join(saved_dir, "model.safetensors"))
        model = self.load(config, base_sd, lora)
        lora_sd = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        assert lora_sd and set(model.state_dict()) - set(lora_sd) == set(self.family.hf_to_tune(base_sd, config.to_dict()))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.normal_(0.0, 0.2)
        tokens, real, pos, mask = self.padded_batch()
        lora_logits = tune_logits(model, tokens, real, pos, mask)

        # Merged weights exported to HF.
        merged = get_merged_lora_ckpt({k: v.clone() for k, v in model.state_dict().items()},
                                      rank=lora.lora_rank, alpha=lora.lora_alpha)
        merged_hf = self.hf_cls(config).eval()
        merged_hf.load_state_dict(self.family.tune_to_hf(merged, config.to_dict()), strict=False)
        merged_diff = max_diff(hf_logits(merged_hf, tokens, real, pos), lora_logits, real)

        # PEFT adapter on the HF base.
        peft_sd, targets, extra = self.family.lora_to_peft(model.state_dict(), config.to_dict(), lora)
        LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha, lora_dropout=0.0, target_modules=targets,
                   **extra).save_pretrained(tmp_path)
        save_file(peft_sd, os.path.join(tmp_path, "adapter_model.safetensors"))
        base_hf = self.hf_cls.from_pretrained(saved_dir).eval()
        base_logits = hf_logits(base_hf, tokens, real, pos)  # PEFT wraps base_hf in place below
        peft_model = PeftModel.from_pretrained(base_hf, tmp_path).eval()
        names = set(peft_model.state_dict())
        for key in peft_sd:
            assert key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.") in names, key
        peft_diff = max_diff(hf_logits(peft_model, tokens, real, pos), lora_logits, real)
        # Merging rounds W + s*B@A once in fp32: an error relative to the logits' scale (Gemma's
        # tied, sqrt(d)-scaled embeddings give logits of order 10).
        tol = ATOL * max(1.0, lora_logits[real].abs().max().item())
        print(f"{self.name} lora {lora.lora_attn_modules} merged diff = {merged_diff:.3g}, peft diff = {peft_diff:.3g}, tol {tol:.3g}")
        assert merged_diff < tol and peft_diff < tol
        assert max_diff(base_logits, lora_logits, real) > 1e-3  # the adapters really change the output
        return peft_sd, targets, extra
