def load_checkpoint_tokenizer(checkpoint_dir, max_seq_len=None):
    from distillm_tune.models.llama import load_tokenizer
    return load_tokenizer(checkpoint_dir, max_seq_len)
