"""Training metrics: summed on each rank over a log window and reduced in one collective (`WindowMetrics`), then
written by rank 0 to a JSONL file in the run directory and W&B (`MetricsSink`).

Shape legend: L MoE layers (in decoder order), E experts.
"""

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import LoggingConfig

log = logging.getLogger(__name__)

LOSSES = ("loss", "lm_loss", "aux_loss", "z_loss")


@dataclass
class WindowTotals:
    """One log window over all ranks, on the host."""

    micro_steps: int  # per rank
    losses: dict[str, float]  # LOSSES, each the mean over micro steps and ranks
    layer_aux_loss_L: torch.Tensor  # each MoE layer's balancing loss, the mean over micro steps and ranks
    layer_z_loss_L: torch.Tensor  # each MoE layer's z-loss, the same mean
    received_LE: torch.Tensor  # routes each expert received after the capacity limit, summed
    demand_LE: torch.Tensor  # routes the router asked of each expert, summed
    dropped_L: torch.Tensor  # share of routes dropped, the mean over micro steps and ranks


class WindowMetrics:
    """What the model reports each micro step, summed on this rank until the next log: one flat device tensor.

    `add` runs every micro step and never syncs the host; `reduce` runs at log time: one all_reduce for every
    number (losses, per-layer losses, drops, expert loads, the micro-step count), then one copy to the host.
    """

    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device) -> None:
        self.L, self.E = num_moe_layers, num_experts
        # [losses | aux loss L | z loss L | dropped L | received L*E | demand L*E | micro steps]
        self._sums = torch.zeros(len(LOSSES) + 3 * self.L + 2 * self.L * self.E + 1, device=device)

    def add(self, out) -> None:
        """One micro step's MoeCausalLMOutputWithPast."""
        with torch.no_grad():
            self._sums += torch.cat([
                torch.stack([getattr(out, name) for name in LOSSES]).float(),
                out.layer_aux_loss.float(),
                out.layer_z_loss.float(),
                out.dropped_fraction.float(),
                out.tokens_per_expert.float().flatten(),
                out.router_demand.float().flatten(),
                torch.ones(1, device=self._sums.device),
            ])

    def reduce(self) -> WindowTotals:
        """Collective: every rank calls it at the same step. Starts the next window."""
        dist.all_reduce(self._sums)
        sums = self._sums.to("cpu", copy=True)  # syncs the device: once per log window
        self._sums.zero_()
        L, E, world = self.L, self.E, dist.get_world_size()
        micro_steps_all_ranks = sums[-1].item()
        losses, aux_L, z_L, dropped_L, received, demand = sums[:-1].split([len(LOSSES), L, L, L, L * E, L * E])
        losses = losses / micro_steps_all_ranks
        return WindowTotals(
            micro_steps=round(micro_steps_all_ranks / world),
            losses={name: value for name, value in zip(LOSSES, losses.tolist())},
            layer_aux_loss_L=aux_L / micro_steps_all_ranks,
            layer_z_loss_L=z_L / micro_steps_all_ranks,
            received_LE=received.view(L, E),
            demand_LE=demand.view(L, E),
            dropped_L=dropped_L / micro_steps_all_ranks,
        )


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
