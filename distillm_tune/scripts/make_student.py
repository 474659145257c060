"""A student initialised from its teacher by keeping a subset of the teacher's layers.

    python -m distillm_tune.scripts.make_student --teacher DIR --layers 0,6,12,18,24,29 --out DIR

Works on the HF checkpoint itself, for any decoder-only family: the kept blocks' weights are
renumbered 0..n-1, everything outside the blocks (embeddings, final norm, head) is copied, and
``config.json`` gets the new layer count (and, for configs listing one attention type per layer
such as Gemma 2's ``layer_types``, the kept layers' entries). Tokenizer and generation files are
copied, so teacher and student share one tokenizer. Keeping the first and last layers and spreading
the rest evenly is the usual choice when no smaller sibling of the teacher exists.
"""

import argparse
import os
import re
from typing import List

from distillm_tune.models.hf import (
    CONFIG_FILE, _atomic_dir, _copy_side_files, _write_config, _write_weights, read_hf_config, read_hf_state_dict,
)

# config.json key holding the number of decoder layers, per naming convention (Llama-likes, GPT-2)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
# a decoder block's index inside a weight name: model.layers.3., transformer.h.3., decoder.layers.3.
_BLOCK = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")


def parse_layers(text: str) -> List[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer indices, e.g. 0,6,12") from None
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"--layers {text!r}: expected distinct indices in increasing order")
    return layers


def make_student(teacher_dir: str, layers: List[int], out_dir: str) -> str:
    config = read_hf_config(teacher_dir)
    if config.get("is_encoder_decoder"):
        raise ValueError(f"{os.path.join(teacher_dir, CONFIG_FILE)}: make_student keeps decoder-only layers; "
                         f"model_type {config.get('model_type')!r} is an encoder-decoder")
    key = next((k for k in LAYER_COUNT_KEYS if k in config), None)
    if key is None:
        raise ValueError(f"{os.path.join(teacher_dir, CONFIG_FILE)} has none of {LAYER_COUNT_KEYS}")
    n = int(config[key])
    if layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"--layers {layers}: the teacher has layers 0..{n - 1} ({key}={n})")
    new_index = {old: new for new, old in enumerate(layers)}
    student = {}
    for name, tensor in read_hf_state_dict(teacher_dir).items():
        match = _BLOCK.search(name)
        if match is None:
            student[name] = tensor
        elif int(match.group(3)) in new_index:
            block = f"{match.group(1)}{match.group(2)}.{new_index[int(match.group(3))]}."
            student[name[: match.start()] + block + name[match.end():]] = tensor
    config = {**config, key: len(layers)}
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][i] for i in layers]
    with _atomic_dir(out_dir) as tmp:
        _write_weights(student, tmp, "5GB")
        _write_config(config, tmp, student)
        _copy_side_files(teacher_dir, tmp)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher HF checkpoint directory")
    ap.add_argument("--layers", required=True, help="teacher layers to keep, e.g. 0,6,12,18,24,29")
    ap.add_argument("--out", required=True, help="student checkpoint directory to write")
    args = ap.parse_args(argv)
    print(make_student(args.teacher, parse_layers(args.layers), args.out))


if __name__ == "__main__":
    main()
