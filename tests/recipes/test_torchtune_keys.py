"""torchtune's common recipe keys in ``kd_offpolicy``: ``compile``, ``profiler``,
``log_peak_memory_stats``, ``log_config`` to every metric logger (TensorBoard here), and the
schema's components (SGO scheduler and replay buffer as ``_component_``)."""

import glob
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_same_losses, make_cfg, read_metrics, run_recipe


def _run(cfg):
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe


def _state(recipe):
    return {k: v.detach().clone() for k, v in recipe.student.state_dict().items()}


@pytest.mark.slow
def test_compile_gives_the_eager_run(tiny_assets, tmp_path):
    """torch.compile of the models' layers and of the divergence kernel trains the same run."""
    args = ("method=kd", "max_steps_per_epoch=3", "epochs=1")
    eager, eager_rows = run_recipe(tiny_assets, str(tmp_path / "eager"), *args)
    compiled, compiled_rows = run_recipe(tiny_assets, str(tmp_path / "compiled"), *args, "compile=true")
    layers = [m for m in compiled.student.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert layers, "compile=true compiled no layer"
    # the divergence's per-row kernel, which the logits path's autograd function calls, is compiled
    assert hasattr(compiled.loss_fn.token_values_and_grad, "_torchdynamo_orig_callable")
    assert not hasattr(eager.loss_fn.token_values_and_grad, "_torchdynamo_orig_callable")
    assert_same_losses(compiled_rows, eager_rows, keys=("loss", "loss_div", "loss_ce", "grad_norm"), rel=1e-4)
    a, b = _state(compiled), _state(eager)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


def test_profiler_writes_a_trace(tiny_assets, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_assets, str(out), "method=kd", "max_steps_per_epoch=3", "epochs=1", "profiler.enabled=true",
               "profiler.wait_steps=0", "profiler.warmup_steps=1", "profiler.active_steps=1", "profiler.num_cycles=1",
               "profiler.cuda=false", "profiler.xpu=false")
    traces = glob.glob(str(out / "profiling_outputs" / "iteration_*" / "*.pt.trace.json*"))
    assert traces, f"no trace under {out / 'profiling_outputs'}"
    assert os.path.getsize(traces[0]) > 1000


def test_log_peak_memory_stats_logs_the_process_peak(tiny_assets, tmp_path):
    _, rows = run_recipe(tiny_assets, str(tmp_path), "method=kd", "max_steps_per_epoch=2", "epochs=1",
                         "log_peak_memory_stats=true")
    import resource

    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    assert all(0 < r["peak_memory_rss"] <= now for r in rows)
    _, plain = run_recipe(tiny_assets, str(tmp_path / "plain"), "method=kd", "max_steps_per_epoch=2", "epochs=1")
    assert all("peak_memory_rss" not in r for r in plain)


def test_tensorboard_receives_config_and_metrics(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ("method=kd", "max_steps_per_epoch=3", "epochs=1")
    tb_dir = tmp_path / "tb"
    _run(make_cfg(tiny_assets, str(tmp_path / "with_tb"), *args,
                  "metric_logger={_component_: distillm_tune.training.TensorBoardLogger, log_dir: " + str(tb_dir) + "}"))
    _, jsonl_rows = run_recipe(tiny_assets, str(tmp_path / "jsonl"), *args)
    (run_dir,) = glob.glob(str(tb_dir / "run_*"))
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    # scalars: the same per-step values the JSON-lines logger records for the same run
    loss = {e.step: float(torch.tensor(e.tensor_proto.float_val[0])) for e in events.Tensors("loss")} \
        if "loss" in tags.get("tensors", []) else {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(loss) == [1, 2, 3]
    for row in jsonl_rows:
        assert loss[row["step"]] == pytest.approx(row["loss"], rel=1e-6)
    # the config: as text in TensorBoard, and torchtune's torchtune_config.yaml in output_dir
    (text,) = [e for e in events.Tensors("config/text_summary")]
    config_text = text.tensor_proto.string_val[0].decode()
    assert "method: kd" in config_text and "max_steps_per_epoch: 3" in config_text
    saved = OmegaConf.load(tmp_path / "with_tb" / "torchtune_config.yaml")
    assert saved.method == "kd" and saved.sgo.scheduler.phi0 == 0.0  # defaults filled in


def test_distillm_logs_the_schedulers_starting_validation_loss(tiny_assets, tmp_path):
    recipe, _ = run_recipe(tiny_assets, str(tmp_path), "method=distillm", "sgo.scheduler.phi0=0.3",
                           "max_steps_per_epoch=2", "epochs=1")
    start = [r for r in read_metrics(str(tmp_path), with_start=True) if r["step"] == 0]
    assert len(start) == 1 and start[0]["phi"] == 0.3
    # the reference the scheduler and the divergence guard compare against
    assert start[0]["val_loss_start"] == pytest.approx(recipe.first_val_loss)


class HalfBuffer:
    """A user's replay buffer: the stock one with half the capacity asked for."""

    def __new__(cls, capacity: int):
        from distillm_tune.sgo import ReplayBuffer

        return ReplayBuffer(capacity=max(1, capacity // 2))


def test_sgo_scheduler_and_replay_buffer_are_components(tiny_assets, tmp_path):
    cfg = make_cfg(tiny_assets, str(tmp_path), "method=distillm", "sgo.replay_buffer.capacity=6")
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(cfg)
    recipe.setup()
    assert recipe.buffer.capacity == 6 and type(recipe.scheduler).__name__ == "AdaptiveSGOScheduler"
    recipe.cleanup()
    cfg = make_cfg(tiny_assets, str(tmp_path / "custom"), "method=distillm",
                   "sgo.replay_buffer={_component_: test_torchtune_keys.HalfBuffer, capacity: 6}")
    recipe = KDOffPolicyRecipe(cfg)
    recipe.setup()
    assert recipe.buffer.capacity == 3
    recipe.cleanup()
