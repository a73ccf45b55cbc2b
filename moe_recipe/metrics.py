"""Training metrics: the step losses summed on each rank over a log window and reduced in one collective
(`LossWindow`; the routers reduce their own numbers, `MoeForCausalLM.routing_metrics`), then written by rank 0 to a
JSONL file in the run directory and W&B (`MetricsSink`).
"""

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import LoggingConfig

log = logging.getLogger(__name__)

LOSSES = ("loss", "lm_loss", "aux_loss", "z_loss")  # the model's loss and its parts: train/<name> in the metrics


class LossWindow:
    """The losses of each micro step (`StepResult.losses`), summed on this rank until the next log: one device tensor.

    `add` runs every step and never syncs the host; `reduce` runs at log time: one all_reduce, one copy to the host.
    """

    def __init__(self, device: torch.device) -> None:
        self._sums = torch.zeros(len(LOSSES) + 1, device=device)  # [LOSSES | micro steps]

    def add(self, losses_ML: torch.Tensor) -> None:
        self._sums += torch.cat([losses_ML.sum(0), losses_ML.new_tensor([losses_ML.shape[0]])])

    def reduce(self) -> dict[str, float]:
        """Collective: every rank calls it at the same step. Each loss's mean over the window's micro steps on every
        rank. Starts the next window."""
        dist.all_reduce(self._sums)
        sums = self._sums.tolist()  # syncs the device: once per log window
        self._sums.zero_()
        return {name: value / sums[-1] for name, value in zip(LOSSES, sums)}


class MetricsSink:
    """Where metrics and images go: a JSONL file in the run directory and W&B, both written by rank 0 only."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self._wandb_run = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.wandb_mode != "disabled":
            import wandb

            # One W&B run per run directory: a resumed job continues the same W&B run.
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self._wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=run_id,
                resume="allow",
                mode=cfg.wandb_mode,
                dir=str(run_dir),
                tags=list(cfg.tags),
                config=run_config,
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def log_image(self, name: str, path: Path, step: int, caption: str | None = None) -> None:
        """An image file already written (a PNG in the run directory): W&B uploads it; the JSONL holds numbers only."""
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({name: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
