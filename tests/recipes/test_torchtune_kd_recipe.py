"""Our divergences as ``kd_loss`` in torchtune's stock ``knowledge_distillation_single_device``.

``tune run knowledge_distillation_single_device`` on CPU with tiny llama2 models built from
torchtune's builders (checkpoints written here), a SentencePiece tokenizer trained here, a local
json instruct dataset, and ``kd_loss._component_`` our SRKL wrapper; step 1's logged ``kd_loss``
is recomputed independently: the same models, tokenizer and first batch, SRKL in float64 from
probabilities.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env

DIMS = dict(num_heads=4, num_kv_heads=2, max_seq_len=128)
STUDENT = dict(num_layers=2, embed_dim=32, **DIMS)
TEACHER = dict(num_layers=3, embed_dim=64, **DIMS)
ALPHA = 0.1
BATCH = 4


def _write_assets(root):
    import io

    import sentencepiece as spm
    from torchtune.models.llama2 import llama2

    from distillm_tune.scripts.make_tiny_assets import make_task_rows

    rows = [{"input": f"{r['instruction']}\n{r['context']}", "output": r["response"]}
            for r in make_task_rows(24, seed=3)]
    data = os.path.join(root, "data.json")
    with open(data, "w") as f:
        json.dump(rows, f)
    model = io.BytesIO()  # llama layout: unk 0, bos 1, eos 2, no pad (torchtune pads with 0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([r["input"] + " " + r["output"] for r in rows] * 4), model_writer=model,
        vocab_size=150, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    tok = os.path.join(root, "tokenizer.model")
    with open(tok, "wb") as f:
        f.write(model.getvalue())
    vocab = spm.SentencePieceProcessor(model_file=tok).get_piece_size()
    for name, dims, seed in (("student", STUDENT, 1), ("teacher", TEACHER, 2)):
        torch.manual_seed(seed)
        os.makedirs(os.path.join(root, name))
        torch.save(llama2(vocab_size=vocab, **dims).state_dict(), os.path.join(root, name, "model.pt"))
    return data, tok, vocab


def _config(root, data, tok, vocab):
    def ckpt(name):
        return {"_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
                "checkpoint_dir": os.path.join(root, name), "checkpoint_files": ["model.pt"],
                "recipe_checkpoint": None, "output_dir": os.path.join(root, "out"), "model_type": "LLAMA2"}

    return {
        "output_dir": os.path.join(root, "out"),
        "model": {"_component_": "torchtune.models.llama2.lora_llama2", "lora_attn_modules": ["q_proj", "v_proj"],
                  "apply_lora_to_mlp": False, "apply_lora_to_output": False, "lora_rank": 4, "lora_alpha": 8,
                  "vocab_size": vocab, **STUDENT},
        "teacher_model": {"_component_": "torchtune.models.llama2.llama2", "vocab_size": vocab, **TEACHER},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer", "path": tok,
                      "max_seq_len": 96, "prompt_template": None},
        "checkpointer": ckpt("student"), "teacher_checkpointer": ckpt("teacher"),
        "resume_from_checkpoint": False, "save_adapter_weights_only": False,
        "dataset": {"_component_": "torchtune.datasets.instruct_dataset", "source": "json",
                    "data_files": data, "split": "train", "packed": False},
        "seed": 0, "shuffle": False, "batch_size": BATCH,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 1},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss", "num_output_chunks": 4},
        "kd_loss": {"_component_": "distillm_tune.losses.torchtune_compat.SkewReverseKLWithChunkedOutputLoss",
                    "num_output_chunks": 4, "alpha": ALPHA},
        "kd_ratio": 0.5,
        "epochs": 1, "max_steps_per_epoch": 3, "gradient_accumulation_steps": 1, "clip_grad_norm": None,
        "compile": False, "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": os.path.join(root, "logs"), "filename": "log.txt"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "device": "cpu", "dtype": "fp32",
    }


def _srkl64(student_logits, teacher_logits, labels, alpha):
    keep = labels != -100
    q = torch.softmax(student_logits.double()[keep], -1)
    p = torch.softmax(teacher_logits.double()[keep], -1)
    m = (1 - alpha) * p + alpha * q
    return ((torch.xlogy(q, q) - torch.xlogy(q, m)).sum() / keep.sum()).item()


def _first_step_reference(cfg):
    """SRKL(α) and CE of the initial student (LoRA B starts at 0: the base model) and the teacher
    on the recipe's first batch (no shuffle: the first ``batch_size`` rows), labels shifted as the
    recipe shifts them."""
    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.data import padded_collate_sft
    from torchtune.models.llama2 import llama2

    cfg = OmegaConf.create(cfg)
    tokenizer = config.instantiate(cfg.tokenizer)
    ds = config.instantiate(cfg.dataset, tokenizer)
    batch = padded_collate_sft([ds[i] for i in range(BATCH)], padding_idx=tokenizer.pad_id, ignore_idx=-100)
    logits = []
    for name, dims in (("student", STUDENT), ("teacher", TEACHER)):
        model = llama2(vocab_size=cfg.model.vocab_size, **dims).eval()
        model.load_state_dict(torch.load(os.path.join(cfg.checkpointer.checkpoint_dir if name == "student"
                                                      else cfg.teacher_checkpointer.checkpoint_dir, "model.pt")))
        with torch.no_grad():
            logits.append(model(batch["tokens"]))
    labels = torch.hstack((batch["labels"][:, 1:], torch.full((BATCH, 1), -100)))
    ce = torch.nn.functional.cross_entropy(logits[0].double().flatten(0, 1), labels.flatten(), ignore_index=-100)
    return _srkl64(logits[0], logits[1], labels, ALPHA), ce.item()


def test_srkl_as_kd_loss_of_torchtunes_stock_recipe(tmp_path):
    root = str(tmp_path)
    data, tok, vocab = _write_assets(root)
    cfg = _config(root, data, tok, vocab)
    path = os.path.join(root, "kd.yaml")
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(cfg), path)
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", "knowledge_distillation_single_device",
                           "--config", path], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(root, "logs", "log.txt")) as f:
        steps = [dict(re.findall(r"(\w+):(\S+)", line.split("|", 1)[1])) for line in f if line.startswith("Step")]
    assert len(steps) == 3
    kd = [float(s["kd_loss"]) for s in steps]
    assert all(torch.isfinite(torch.tensor(kd))) and all(k > 0 for k in kd)
    kd_ref, ce_ref = _first_step_reference(cfg)
    assert kd[0] == pytest.approx(kd_ref, rel=1e-5)
    assert float(steps[0]["class_loss"]) == pytest.approx(ce_ref, rel=1e-5)
    # the student trained: the recipe saved a checkpoint with LoRA adapters at the epoch's end
    assert any(f.startswith("adapter") for f in os.listdir(os.path.join(root, "out", "epoch_0")))
