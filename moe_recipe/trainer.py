"""The training loop: one step function, and one place where periodic work (log, eval, checkpoint) hangs."""

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from moe_model import MoeConfig

from .checkpoint import load_checkpoint, resolve_resume_dir, save_checkpoint
from .config import RecipeConfig, global_batch_size
from .data import PackedSplits, eval_micro_batches, train_micro_batch
from .engine import flops_per_token
from .metrics import MetricsSink
from .plan.hardware import guess_peak_flops
from .routing_report import RoutingReport, router_demand, shares

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Sums over the micro steps of one optimizer step on this rank (tensors: no host sync until logged)."""

    losses: torch.Tensor  # [4]: loss, lm_loss, aux_loss, z_loss
    tokens_per_expert: torch.Tensor  # [L, E]
    dropped_fraction: torch.Tensor  # [L]
    router_demand: torch.Tensor  # [L, E]: the router's top-k choices, before the capacity limit

    def __iadd__(self, other: "StepStats") -> "StepStats":
        self.losses += other.losses
        self.tokens_per_expert += other.tokens_per_expert
        self.dropped_fraction += other.dropped_fraction
        self.router_demand += other.router_demand
        return self


class PreemptionSignal:
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM: checkpoint at the end of the step and exit."""

    def __init__(self) -> None:
        self.received = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint and stop after this step", signum)
        self.received = True

    def any_rank(self, device: torch.device) -> bool:
        # Ranks may see the signal at different steps; they must agree on where to stop.
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    def __init__(self, engine, cfg: RecipeConfig, model_config: MoeConfig, splits: PackedSplits, run_dir: Path,
                 metrics: MetricsSink, total_steps: int) -> None:
        self.engine = engine
        self.cfg = cfg
        self.t = cfg.trainer
        self.splits = splits
        self.metrics = metrics
        self.total_steps = total_steps
        self.checkpoint_dir = run_dir / "checkpoints"
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = engine.device
        self.tokens_per_step = global_batch_size(self.t, self.world_size) * cfg.data.seq_len
        self.flops_per_token = flops_per_token(model_config, cfg.data.seq_len)
        self.peak_flops = self.t.peak_flops_per_device or guess_peak_flops()
        self.preemption = PreemptionSignal()
        self.preempted = False
        self.routing = RoutingReport(run_dir / "routing", self.t.heatmap_interval, model_config.num_experts_per_tok,
                                     list(range(len(model_config.moe_layer_indices))))

    def fit(self) -> None:
        resume_dir = resolve_resume_dir(self.t.resume, self.checkpoint_dir)
        start_step = load_checkpoint(self.engine, resume_dir) if resume_dir else 0
        if start_step >= self.total_steps:
            log.info("nothing to do: the checkpoint is at step %d of %d", start_step, self.total_steps)
            return
        end_step = self.total_steps
        if self.t.stop_after_steps is not None:
            end_step = min(end_step, start_step + self.t.stop_after_steps)
        progress = tqdm(total=self.total_steps, initial=start_step, disable=self.rank != 0, desc="train",
                        dynamic_ncols=True)
        self.engine.train()
        window, window_start, window_steps = None, time.perf_counter(), 0
        for step in range(start_step, end_step):
            stats = self.train_step(step)
            window = stats if window is None else window.__iadd__(stats)
            window_steps += 1
            done = step + 1
            progress.update(1)
            # Everything periodic happens here, at step boundaries, on every rank (the reductions are collective).
            if done % self.t.log_interval == 0 or done == self.total_steps:
                metrics = self.reduce(window, window_steps, time.perf_counter() - window_start)
                self.metrics.log(metrics, step=done)
                if self.rank == 0 and self.routing.due(done, last_step=done == self.total_steps):
                    self.routing.write(done, self.metrics.wandb_run)
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
                window, window_start, window_steps = None, time.perf_counter(), 0
            if done % self.t.eval_interval == 0 or done == self.total_steps:
                eval_metrics = self.evaluate()
                self.metrics.log(eval_metrics, step=done)
                progress.write(f"step {done}: eval loss {eval_metrics['eval/loss']:.4f} "
                               f"ppl {eval_metrics['eval/perplexity']:.2f}")
                window_start = time.perf_counter()  # keep eval time out of tokens/s
            self.preempted = self.preemption.any_rank(self.device)
            if done % self.t.checkpoint_interval == 0 or done == end_step or self.preempted:
                path = save_checkpoint(self.engine, self.checkpoint_dir, done)
                progress.write(f"step {done}: checkpoint {path}")
                window_start = time.perf_counter()
            if self.preempted:
                log.warning("stopping at step %d after preemption signal", done)
                break
        progress.close()

    def train_step(self, step: int) -> StepStats:
        stats = None
        for micro_step in range(self.t.grad_accum):
            input_ids = train_micro_batch(
                self.splits.train, step=step, micro_step=micro_step, rank=self.rank, world_size=self.world_size,
                micro_batch_size=self.t.micro_batch_size, grad_accum=self.t.grad_accum, seed=self.cfg.data.seed,
            ).to(self.device)
            out = self.engine(input_ids=input_ids, labels=input_ids)
            self.engine.backward(out.loss)
            self.engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            micro = StepStats(
                losses=torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float(),
                tokens_per_expert=out.tokens_per_expert.detach().float(),
                dropped_fraction=out.dropped_fraction.detach().float(),
                router_demand=router_demand(out.router_logits, self.routing.top_k),
            )
            stats = micro if stats is None else stats.__iadd__(micro)
        return stats

    def reduce(self, window: StepStats, steps: int, seconds: float) -> dict[str, float]:
        """Average over micro steps, steps and ranks; sum expert loads over ranks. `.item()` syncs the device."""
        micro_steps = steps * self.t.grad_accum
        losses = window.losses / micro_steps
        dist.all_reduce(losses)
        losses /= self.world_size
        tokens_per_expert = window.tokens_per_expert.clone()
        dist.all_reduce(tokens_per_expert)
        demand = window.router_demand.clone()
        dist.all_reduce(demand)
        dropped = window.dropped_fraction / micro_steps
        dist.all_reduce(dropped)
        dropped /= self.world_size
        tokens_per_s = self.tokens_per_step * steps / seconds
        achieved_flops = self.flops_per_token * tokens_per_s / self.world_size
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "train/loss": losses[0].item(),
            "train/lm_loss": losses[1].item(),
            "train/aux_loss": losses[2].item(),
            "train/z_loss": losses[3].item(),
            "train/lr": self.engine.get_lr()[0],
            "perf/tokens_per_s": tokens_per_s,
            "perf/flops_per_s_per_device": achieved_flops,
        }
        if grad_norm is not None:  # DeepSpeed keeps no global norm at ZeRO stage 0
            metrics["train/grad_norm"] = float(grad_norm)
        if self.peak_flops:
            metrics["perf/mfu"] = achieved_flops / self.peak_flops
        share = shares(tokens_per_expert)
        demand_share = shares(demand).tolist()
        for layer, (layer_share, layer_dropped) in enumerate(zip(share.tolist(), dropped.tolist())):
            metrics[f"routing/layer_{layer}/dropped_fraction"] = layer_dropped
            metrics[f"routing/layer_{layer}/max_load"] = max(layer_share) * len(layer_share)
            metrics[f"routing/layer_{layer}/max_demand"] = max(demand_share[layer]) * len(layer_share)
            for expert, value in enumerate(layer_share):
                metrics[f"routing/layer_{layer}/expert_{expert}"] = value
        self.routing.observe(tokens_per_expert, demand, dropped)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the validation blocks, every rank on its own shard (same count per rank)."""
        self.engine.eval()
        totals = torch.zeros(2, device=self.device)  # loss x targets, targets
        for input_ids in eval_micro_batches(self.splits.val, rank=self.rank, world_size=self.world_size,
                                            micro_batch_size=self.t.micro_batch_size,
                                            max_batches=self.t.eval_batches):
            input_ids = input_ids.to(self.device)
            out = self.engine(input_ids=input_ids, labels=input_ids)
            targets = input_ids[:, 1:].numel()
            totals += torch.stack([out.lm_loss.float() * targets, torch.tensor(float(targets), device=self.device)])
        dist.all_reduce(totals)
        self.engine.train()
        loss = (totals[0] / totals[1]).item()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 30.0))}
