"""Build everything a CPU demo or test run needs, offline and deterministically.

    python -m distillm_tune.scripts.make_tiny_assets DIR [--train 2000 --valid 200 --test 200]

writes

    DIR/data/{train,valid,test}.jsonl   dolly-format rows of small tasks with checkable answers
                                        (sorting, reversing, counting, adding, upper-casing,
                                        extracting numbers), so ROUGE-L against the reference
                                        means something
    DIR/tokenizer/                      a byte-level BPE tokenizer trained on that text
    DIR/teacher/, DIR/student/          random GPT-2 checkpoints in Hugging Face format
                                        (teacher 4 layers x 128, student 2 layers x 64)

With ``--seq2seq``: SAMSum-format dialogues and summaries, a SentencePiece tokenizer and random
mT5 checkpoints, for the encoder-decoder path (``configs/tiny_t5_cpu.yaml``).

The checkpoints are plain ``save_pretrained`` output, so the recipe loads them exactly as it loads
a real GPT-2 from a user's disk.
"""

import argparse
import json
import os
import random
from typing import Dict, List

WORDS = (
    "apple banana cherry grape lemon mango melon orange peach pear plum kiwi fig lime date "
    "cat dog cow fox owl bee ant bat elk yak hen pig rat eel "
    "red blue green black white pink gold gray "
    "sun moon star rain snow wind tree rock lake hill road door book lamp desk cup"
).split()

TASKS = ("sort", "reverse", "count", "add", "upper", "numbers")


def _task_row(kind: str, rng: random.Random) -> Dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    if kind == "sort":
        return {"instruction": "Sort these words in alphabetical order.",
                "context": " ".join(words), "response": " ".join(sorted(words))}
    if kind == "reverse":
        return {"instruction": "Write these words in reverse order.",
                "context": " ".join(words), "response": " ".join(reversed(words))}
    if kind == "count":
        return {"instruction": "How many words are in the text?",
                "context": " ".join(words), "response": f"There are {len(words)} words."}
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"instruction": "Add the two numbers.", "context": f"{a} + {b}",
                "response": f"{a} + {b} = {a + b}"}
    if kind == "upper":
        return {"instruction": "Write the words in capital letters.",
                "context": " ".join(words[:3]), "response": " ".join(w.upper() for w in words[:3])}
    numbers = [str(rng.randint(1, 999)) for _ in range(rng.randint(1, 3))]
    mixed = words[:3] + numbers
    rng.shuffle(mixed)
    return {"instruction": "List the numbers that appear in the text.",
            "context": " ".join(mixed), "response": ", ".join(w for w in mixed if w.isdigit())}


def make_task_rows(n: int, seed: int) -> List[Dict[str, str]]:
    """``n`` dolly-format rows, cycling through the task kinds; deterministic in ``seed``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = TASKS[i % len(TASKS)]
        rows.append({**_task_row(kind, rng), "category": kind})
    return rows


def write_jsonl(rows: List[Dict[str, str]], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def train_tokenizer(texts: List[str], out_dir: str, vocab_size: int = 512) -> None:
    """A GPT-2-style byte-level BPE with ``<|endoftext|>`` as BOS = EOS, as transformers writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"}, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def make_gpt2(out_dir: str, tokenizer_dir: str, n_layer: int, n_embd: int, n_head: int,
              seed: int, n_positions: int = 256) -> None:
    """A randomly initialised GPT-2 in HF format, with the tokenizer files beside it."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        vocab = json.load(f)["model"]["vocab"]
    eos = vocab["<|endoftext|>"]
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, bos_token_id=eos, eos_token_id=eos,
        # no dropout: runs are reproducible to the bit and tiny models do not need it
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out_dir)


def make_tiny_assets(out: str, train: int = 2000, valid: int = 200, test: int = 200,
                     seed: int = 0, vocab_size: int = 512) -> Dict[str, str]:
    rows = make_task_rows(train + valid + test, seed)
    splits = {"train": rows[:train], "valid": rows[train:train + valid], "test": rows[train + valid:]}
    for name, part in splits.items():
        write_jsonl(part, os.path.join(out, "data", f"{name}.jsonl"))
    from distillm_tune.data.instruction import format_prompt

    # trained on what the models will read, so the prompt template gets merged into few tokens
    texts = [format_prompt(r["instruction"], r["context"]) + r["response"] for r in rows]
    train_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size)
    make_gpt2(os.path.join(out, "teacher"), os.path.join(out, "tokenizer"), 4, 128, 4, seed + 1)
    make_gpt2(os.path.join(out, "student"), os.path.join(out, "tokenizer"), 2, 64, 2, seed + 2)
    return {k: os.path.join(out, k) for k in ("data", "tokenizer", "teacher", "student")}


NAMES = ("Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana")


def make_dialogue_rows(n: int, seed: int) -> List[Dict[str, str]]:
    """SAMSum-format rows (``dialogue``, ``summary``) of short, template-made conversations."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        item, k = rng.choice(WORDS[:29]), rng.randint(2, 9)
        kind = i % 3
        if kind == 0:
            dialogue = f"{a}: Do you have {k} {item}s?\n{b}: Yes, I have {k} {item}s.\n{a}: Great, bring them tomorrow."
            summary = f"{b} will bring {k} {item}s to {a} tomorrow."
        elif kind == 1:
            day = rng.choice(("Monday", "Friday", "Sunday"))
            dialogue = f"{a}: Can we meet on {day}?\n{b}: {day} is fine. At the {item} place?\n{a}: Yes, see you there."
            summary = f"{a} and {b} will meet on {day} at the {item} place."
        else:
            dialogue = f"{a}: I lost my {item}.\n{b}: Oh no! I saw a {item} near the {rng.choice(WORDS[-15:])}.\n{a}: Thanks {b}!"
            summary = f"{a} lost a {item} and {b} saw one."
        rows.append({"dialogue": dialogue, "summary": summary})
    return rows


def train_sentencepiece(texts: List[str], out_dir: str, vocab_size: int = 160) -> None:
    """A T5-style SentencePiece unigram model (pad 0, eos 1, unk 2, no BOS) as ``spiece.model``."""
    import io

    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
        f.write(model.getvalue())


def make_mt5(out_dir: str, tokenizer_dir: str, d_model: int, num_layers: int, num_heads: int, seed: int) -> None:
    """A randomly initialised mT5 (untied head, gated GELU) in HF format, spiece.model beside it."""
    import shutil

    import sentencepiece as spm
    import torch
    from transformers import MT5Config, MT5ForConditionalGeneration

    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "spiece.model"))
    config = MT5Config(
        vocab_size=sp.get_piece_size() + 100, d_model=d_model, d_kv=16, d_ff=2 * d_model,
        num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    # transformers 5 ignores tie_word_embeddings=False in the constructor; mT5's head is untied
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = MT5ForConditionalGeneration(config).eval()
    # ...and then unties the input embeddings too; mT5's encoder and decoder share `shared`
    model.encoder.embed_tokens.weight = model.shared.weight
    model.decoder.embed_tokens.weight = model.shared.weight
    model.save_pretrained(out_dir)
    shutil.copy(os.path.join(tokenizer_dir, "spiece.model"), out_dir)


def make_tiny_seq2seq_assets(out: str, train: int = 600, valid: int = 60, test: int = 60,
                             seed: int = 0) -> Dict[str, str]:
    """SAMSum-format data, a SentencePiece tokenizer and random mT5 teacher (3 x 96) and student
    (2 x 64), for the encoder-decoder path."""
    rows = make_dialogue_rows(train + valid + test, seed)
    splits = {"train": rows[:train], "valid": rows[train:train + valid], "test": rows[train + valid:]}
    for name, part in splits.items():
        write_jsonl(part, os.path.join(out, "data", f"{name}.jsonl"))
    texts = ["summarize: " + r["dialogue"] for r in rows] + [r["summary"] for r in rows]
    train_sentencepiece(texts, os.path.join(out, "tokenizer"))
    make_mt5(os.path.join(out, "teacher"), os.path.join(out, "tokenizer"), 96, 3, 4, seed + 1)
    make_mt5(os.path.join(out, "student"), os.path.join(out, "tokenizer"), 64, 2, 4, seed + 2)
    return {k: os.path.join(out, k) for k in ("data", "tokenizer", "teacher", "student")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="directory to write the assets into")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--valid", type=int, default=200)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--seq2seq", action="store_true", help="SAMSum-style data and mT5 models instead")
    args = ap.parse_args(argv)
    if args.seq2seq:
        paths = make_tiny_seq2seq_assets(args.out, args.train, args.valid, args.test, args.seed)
    else:
        paths = make_tiny_assets(args.out, args.train, args.valid, args.test, args.seed, args.vocab_size)
    for k, v in paths.items():
        print(f"{k:>9}: {v}")


if __name__ == "__main__":
    main()
