"""Evaluation metrics: ROUGE-L and BLEU as the paper reports them."""

from distillm_tune.eval.metrics import bleu, mean_std, rouge_l

__all__ = ["bleu", "mean_std", "rouge_l"]
