"""distillm-tune: DistiLLM (Ko et al., ICML 2024) as a torchtune plugin."""

__version__ = "0.1.0"
