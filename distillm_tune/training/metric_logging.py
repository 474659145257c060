"""A torchtune metric logger that writes one JSON object per line.

torchtune's ``DiskLogger`` writes ``Step N | key:value`` text; JSON lines are what plots, tests
and the reproduction scripts read back without parsing.
"""

import json
import os
import time
from typing import Mapping, Union

from torchtune.training.metric_logging import MetricLoggerInterface
from torchtune.training.metric_logging import TensorBoardLogger as _TorchtuneTensorBoardLogger

Scalar = Union[int, float]


class JsonlMetricLogger(MetricLoggerInterface):
    """Appends ``{"step": N, "time": seconds since start, key: value, ...}`` to ``log_dir/filename``.

    Only rank 0 writes (the recipe logs values already reduced across ranks).
    """

    def __init__(self, log_dir: str, filename: str = "metrics.jsonl", **kwargs):
        self.path = os.path.join(log_dir, filename)
        self._rank = int(os.environ.get("RANK", "0"))
        self._start = time.perf_counter()
        self._file = None
        if self._rank == 0:
            os.makedirs(log_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def resume_at(self, step: int) -> None:
        """A run resumed from its step-``step`` checkpoint logs the later steps again: their
        earlier rows go, so the file holds one row per step however often the run was resumed
        (rewritten atomically)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self._keep_steps_up_to(step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _keep_steps_up_to(self, step: int) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a row torn by a kill mid-write
                continue
        if len(kept) == len(lines):
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        os.replace(tmp, self.path)

    def log(self, name: str, data: Scalar, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: Mapping[str, Scalar], step: int) -> None:
        if self._file is None:
            return
        row = {"step": step, "time": round(time.perf_counter() - self._start, 4)}
        row.update({k: (v.item() if hasattr(v, "item") else v) for k, v in payload.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def log_config(self, config) -> None:
        """The resolved config as ``config.yaml`` beside the metrics (what torchtune's loggers do
        with theirs), so a run's numbers can always be traced to its settings."""
        if self._file is None:
            return
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(OmegaConf.to_container(config, resolve=True)),
                       os.path.join(os.path.dirname(self.path), "config.yaml"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        self.close()


class TensorBoardLogger(_TorchtuneTensorBoardLogger):
    """torchtune's TensorBoard logger, whose ``log_config`` only writes ``torchtune_config.yaml``
    to ``output_dir``; this one also puts the resolved config into TensorBoard (TEXT tab,
    ``config``), so the run's settings travel with its curves."""

    def log_config(self, config) -> None:
        super().log_config(config)
        if self._writer is not None:
            from omegaconf import OmegaConf

            text = OmegaConf.to_yaml(OmegaConf.to_container(config, resolve=True))
            # markdown: indented by four spaces, the YAML shows as a code block
            self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), global_step=0)
            self._writer.flush()
