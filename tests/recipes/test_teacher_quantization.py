"""``teacher.quantization``: torchao weight-only quantization of the frozen teacher.

References: the unquantized teacher (its logits, its weights outside the quantized layers, the
losses of the same run with it) and the 1-process run for the 2-process one.
"""

import os
import subprocess

import pytest
import torch

from distillm_tune.models import load_hf
from distillm_tune.training.model_io import LAYER_CLASSES
from distillm_tune.training.quantization import model_bytes, quantize_frozen

from conftest import PROCESS_LOSS_REL, REPO, assert_same_losses, read_metrics, run_recipe, subprocess_env, tune_cmd

# measured on the tiny GPT-2 teacher (4 x 128, vocab 300): logits rel. error 0.0097 (int8) and
# 0.127 (nf4); weights 0.354x and 0.232x of fp32. Bounds ~3x / ~1.1x above.
BOUNDS = {"int8_weight_only": dict(logits=0.03, bytes=0.40), "nf4": dict(logits=0.3, bytes=0.26)}


def _logits(model, tokens):
    out = model(tokens)
    return out if torch.is_tensor(out) else torch.cat(out, dim=1)


@pytest.mark.parametrize("scheme", sorted(BOUNDS))
def test_quantized_teacher_stays_close_to_the_full_precision_one(tiny_assets, scheme):
    ref = load_hf(os.path.join(tiny_assets, "teacher")).eval()
    quant = load_hf(os.path.join(tiny_assets, "teacher")).eval()
    before = model_bytes(quant)
    n = quantize_frozen(quant, scheme, LAYER_CLASSES)
    assert n == 6 * len([m for m in quant.modules() if isinstance(m, LAYER_CLASSES)])  # q, k, v, o, fc1, fc2
    tokens = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = _logits(ref, tokens), _logits(quant, tokens)
    assert float((a - b).norm() / a.norm()) < BOUNDS[scheme]["logits"]
    assert model_bytes(quant) < BOUNDS[scheme]["bytes"] * before
    # the head and the embeddings stay as loaded (the logits the student learns from)
    ref_state, quant_state = ref.state_dict(), quant.state_dict()
    untouched = [k for k in ref_state if "layers." not in k]  # the same loaded tensors: no arithmetic, exact
    assert untouched and all(torch.equal(ref_state[k], quant_state[k]) for k in untouched)


def test_recipe_with_an_int8_teacher_tracks_the_full_precision_teacher(tiny_assets, tmp_path):
    args = ("method=kd", "max_steps_per_epoch=4", "epochs=1")
    _, full = run_recipe(tiny_assets, str(tmp_path / "fp32"), *args)
    recipe, int8 = run_recipe(tiny_assets, str(tmp_path / "int8"), *args, "teacher.quantization=int8_weight_only")
    assert type(recipe.teacher.layers[0].attn.q_proj.weight).__name__ == "AffineQuantizedTensor"
    assert_same_losses(int8, full, rel=0.02, keys=("loss", "loss_ce"))
    assert all(r["loss"] != f["loss"] for r, f in zip(int8, full))  # the quantization did change the teacher


@pytest.mark.slow
def test_two_processes_with_a_quantized_teacher_give_the_losses_of_one(tiny_assets, tmp_path):
    """The quantized teacher is not sharded: whole on each rank, no collective in its forward."""
    args = ("method=kd", "teacher.quantization=nf4")
    _, single = run_recipe(tiny_assets, str(tmp_path / "one"), *args, "batch_size=8")
    proc = subprocess.run(tune_cmd(f"assets_dir={tiny_assets}", f"output_dir={tmp_path / 'two'}", *args,
                                   "batch_size=4", nproc=2),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(read_metrics(str(tmp_path / "two")), single, rel=PROCESS_LOSS_REL)
