"""Multi-node: ``tune run --nnodes 2 --nproc_per_node 1`` with a c10d rendezvous, two launches on
this machine (the two "nodes"), against one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import FAST, PROCESS_LOSS_REL, REPO, TINY_CONFIG, assert_same_losses, assert_same_weights, read_metrics, run_recipe, subprocess_env


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def multinode_cmd(port, run_id, *args):
    """One node's launch: the command a user runs on each node (``localhost`` → the first node's
    address); c10d assigns the node ranks at the rendezvous."""
    return [sys.executable, "-m", "torchtune._cli.tune", "run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", run_id,
            "distillm_tune/recipes/kd_offpolicy", "--config", TINY_CONFIG, *FAST, *args]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["mixed_precision=bf16"]], ids=["fp32", "mixed-bf16"])
def test_two_nodes_of_one_process_give_the_losses_and_weights_of_one_process(tiny_assets, tmp_path, extra):
    args = ["method=kd", "epochs=2", *extra]
    out = tmp_path / "two_nodes"
    cmd = multinode_cmd(_free_port(), f"test-{os.getpid()}", f"assets_dir={tiny_assets}", f"output_dir={out}",
                        *args, "batch_size=4")
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = []
    try:
        for p in nodes:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    _, single = run_recipe(tiny_assets, str(tmp_path / "one"), *args, "batch_size=8")
    double = read_metrics(str(out))
    # the two launches formed one group of 2 ranks: each wrote its own per-rank state
    with open(out / "checkpoints" / "step_00000006" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["world_size"] == 2 and {"rank_00000.pt", "rank_00001.pt"} <= set(manifest["files"])
    assert [r["step"] for r in double] == [r["step"] for r in single] == [1, 2, 3, 4, 5, 6]
    # mixed precision: autocast on one process vs FSDP2's bf16 parameters on two (norms and
    # softmax in bf16 too): equal up to bf16 rounding (test_mixed_precision measures it)
    mixed = bool(extra)
    assert_same_losses(double, single, rel=3e-3 if mixed else PROCESS_LOSS_REL)
    assert double[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=3e-3 if mixed else PROCESS_LOSS_REL)
    assert_same_weights(out, tmp_path / "one", rtol=0 if mixed else 1e-4, atol=1e-2 if mixed else 1e-5)
