"""Llama's SentencePiece tokenizer, for checkpoints that ship only ``tokenizer.model`` (OpenLLaMA).

The Llama model itself is torchtune's own (``distillm_tune.models.native``)."""

from distillm_tune.models.llama._tokenizer import OpenLlamaTokenizer

__all__ = ["OpenLlamaTokenizer"]
