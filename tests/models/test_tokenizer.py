"""tokenizer.json checkpoints (models/tokenizer.py) against transformers' AutoTokenizer on the same
files: tiny byte-level BPE tokenizers trained offline, laid out as each family ships them (special
tokens, tokenizer_class, BOS added or not, generation_config's several EOS ids, chat templates).
Instruction data rendered with ``template="chat"`` against ``apply_chat_template``."""

import json

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from distillm_tune.models import load_hf_tokenizer
from distillm_tune.models.tokenizer import HFTokenizer

from decoder_parity import byte_level_bpe, tokenizer_texts  # this folder: pytest puts it on sys.path

# The chat templates of SmolLM2-Instruct and Llama 3 Instruct (abridged: no tools, no dates).
SMOLLM2_CHAT = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# family -> (model_type, special tokens, tokenizer_config entries, generation_config eos ids (names),
#            BOS the tokenizer.json post-processor prepends or None)
STYLES = {
    "llama3_instruct": ("llama", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
                        dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>",
                             eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT),
                        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "<|begin_of_text|>"),
    "smollm2": ("llama", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                dict(tokenizer_class="GPT2Tokenizer", bos_token="<|im_start|>", eos_token="<|im_end|>",
                     pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=SMOLLM2_CHAT),
                ["<|im_end|>"], None),
    "qwen2_5": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                dict(tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>"),
                ["<|im_end|>", "<|endoftext|>"], None),
    "gemma_bos": ("gemma", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                  dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<eos>",
                       pad_token="<pad>", add_bos_token=True),
                  ["<eos>", "<end_of_turn>"], "<bos>"),
}


def make_tokenizer_dir(path, style):
    model_type, specials, config, gen_eos, bos = STYLES[style]
    tok = byte_level_bpe(specials)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, bos_id)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False} for t in specials}
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": added}))
    # Written back by the tokenizer class itself, as checkpoints ship: some classes (Qwen2Tokenizer)
    # impose their own pre-tokenizer, which the saved tokenizer.json then carries.
    AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.token_to_id(t) for t in gen_eos]}))
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


@pytest.fixture(scope="module", params=sorted(STYLES))
def style_dir(request, tmp_path_factory):
    return request.param, make_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)


def test_ids_equal_auto_tokenizer(style_dir):
    style, path = style_dir
    ours = load_hf_tokenizer(path)
    assert isinstance(ours, HFTokenizer)
    theirs = AutoTokenizer.from_pretrained(str(path))
    specials = STYLES[style][1]
    for text in tokenizer_texts(" ".join(specials), f"{specials[-1]}inside{specials[0]} words"):
        ids = ours.encode(text)  # add_bos=True: the checkpoint's own BOS, if it adds one
        assert ids == theirs(text)["input_ids"], (style, text)
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids), (style, text)


def test_special_ids_from_the_checkpoint(style_dir):
    style, path = style_dir
    ours = load_hf_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path))
    _, _, _, gen_eos, bos = STYLES[style]
    assert ours.eos_id == theirs.eos_token_id
    assert ours.bos_id == theirs.bos_token_id
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id)
    assert ours.stop_tokens == sorted({theirs.eos_token_id, *theirs.convert_tokens_to_ids(gen_eos)})
    assert ours.adds_bos == (bos is not None)
    assert ours.vocab_size == len(theirs)


def test_checkpoint_without_tokenizer_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in checkpoint directory .*tokenizer\.json.*tokenizer\.model"):
        load_hf_tokenizer(tmp_path)


def test_special_token_missing_from_vocabulary_is_named(tmp_path):
    make_tokenizer_dir(tmp_path, "smollm2")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' of tokenizer_config.json"):
        load_hf_tokenizer(tmp_path)


ROWS = [{"instruction": "Sort these words.", "context": "pear fig apple", "response": "apple fig pear"},
        {"instruction": "Name a primary colour.", "response": "  red, with spaces \n"},
        {"instruction": "Say the 's thing", "context": "", "response": "the kato riming"}]


@pytest.mark.parametrize("style", ["llama3_instruct", "smollm2"])
def test_chat_template_rendering_and_mask(style, tmp_path):
    """``template: chat``: prompt ids = transformers' rendering up to the assistant cue, response ids =
    the assistant turn up to and including one end-of-turn id, and the collated labels cover exactly
    the response."""
    from distillm_tune.data import instruction_dataset
    from distillm_tune.data.collate import collate_prompt_response

    path = make_tokenizer_dir(tmp_path / "tok", style)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    ours = load_hf_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path))
    ds = instruction_dataset(ours, str(data), split="all", template="chat", max_prompt_len=200, max_seq_len=400)
    assert len(ds) == len(ROWS)
    for row, sample in zip(ROWS, ds.samples):
        content = row["instruction"] + (f"\n\n{row['context']}" if row.get("context") else "")
        user = [{"role": "user", "content": content}]
        prompt_text = theirs.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = theirs.apply_chat_template(user + [{"role": "assistant", "content": row["response"]}],
                                               tokenize=False)
        assert sample["prompt"] == theirs(prompt_text, add_special_tokens=False)["input_ids"]
        assert ours.decode(sample["prompt"]) == prompt_text
        full_ids = theirs(full_text, add_special_tokens=False)["input_ids"]
        assert sample["prompt"] + sample["response"] == full_ids[: len(sample["prompt"] + sample["response"])]
        assert sample["response"][-1] == ours.eos_id
        assert sum(t in ours.stop_tokens for t in sample["response"]) == 1
        batch = collate_prompt_response([sample], pad_id=ours.pad_id)
        labelled = (batch["labels"][0] != -100).nonzero().flatten().tolist()
        # labels[t] predicts tokens[t + 1]: exactly the response positions are trained on
        assert labelled == list(range(len(sample["prompt"]) - 1, len(sample["prompt"]) + len(sample["response"]) - 1))


def test_chat_template_missing_is_named(tmp_path):
    from distillm_tune.data import instruction_dataset

    path = make_tokenizer_dir(tmp_path / "tok", "qwen2_5")  # written without a chat template
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROWS[0]))
    with pytest.raises(ValueError, match="no chat template"):
        instruction_dataset(load_hf_tokenizer(path), str(data), split="all", template="chat")
