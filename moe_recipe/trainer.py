"""The training loop: one step function, and one place where periodic work (log, eval, checkpoint) hangs.

Only rank 0 prints (its logging level is INFO, the other ranks' WARNING); the progress bar is rank 0's too.
"""

import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moe_model import MoeConfig

from .checkpoint import ResumePoint, load_checkpoint, save_checkpoint
from .config import RecipeConfig, global_batch_size
from .data import TrainingData
from .engine import clip_grad_norm, recipe_clips_gradients, resolve_precision, update_expert_bias
from .flops import flops_per_token, guess_peak_flops
from .metrics import MetricsSink, WindowMetrics
from .routing_report import RoutingReport, routing_metrics

log = logging.getLogger(__name__)


class PreemptionSignal:
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM: checkpoint at the next log or checkpoint step
    and exit. Checked only there, where the ranks synchronize anyway (OLMo-core's cancel-check interval): a check
    every step would add an all_reduce and a device-to-host sync to every step. Slurm's warning
    (`--signal=USR1@600` in launch/) must therefore leave time for `trainer.log_interval` steps and a checkpoint."""

    def __init__(self) -> None:
        self.received = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint and stop at the next log or checkpoint step", signum)
        self.received = True

    def any_rank(self, device: torch.device) -> bool:
        """Collective. Ranks may see the signal at different steps; they must agree on where to stop."""
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    def __init__(self, engine, cfg: RecipeConfig, model_config: MoeConfig, data: TrainingData, run_dir: Path,
                 metrics: MetricsSink, total_steps: int) -> None:
        self.engine = engine
        self.cfg = cfg
        self.t = cfg.trainer
        self.data = data
        self.mixture_counts = 0  # samples per store of a mixture in the log window, the same on every rank
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
        self.uses_expert_bias = model_config.uses_expert_bias
        self.clips_gradients = recipe_clips_gradients(cfg, resolve_precision(self.t.precision))
        self.grad_norm = None  # the last step's, when the recipe clips (DeepSpeed keeps none at ZeRO stage 0)
        self.moe_layer_ids = model_config.moe_layer_indices  # metrics name MoE layers by their decoder index
        self.window = WindowMetrics(len(self.moe_layer_ids), model_config.num_experts, self.device)
        self.routing = RoutingReport(run_dir / "routing", self.t.heatmap_interval, model_config.num_experts_per_tok,
                                     self.moe_layer_ids)

    def fit(self, resume_from: ResumePoint | None) -> None:
        start_step = load_checkpoint(self.engine, resume_from) if resume_from else 0
        if start_step >= self.total_steps:
            log.info("nothing to do: the checkpoint is at step %d of %d", start_step, self.total_steps)
            return
        end_step = self.total_steps
        if self.t.stop_after_steps is not None:
            end_step = min(end_step, start_step + self.t.stop_after_steps)
        # Log lines go through tqdm.write while the bar is up, so they do not tear it.
        with logging_redirect_tqdm(), tqdm(total=self.total_steps, initial=start_step, disable=self.rank != 0,
                                           desc="train", dynamic_ncols=True) as progress:
            self.engine.train()
            window_start, window_steps = time.perf_counter(), 0
            for step in range(start_step, end_step):
                self.train_step(step)
                window_steps += 1
                self.mixture_counts = self.mixture_counts + self.data.step_counts(
                    step, global_batch_size(self.t, self.world_size))
                done = step + 1
                progress.update(1)
                # Everything periodic happens here, at step boundaries, on every rank (the reductions are
                # collective).
                log_due = done % self.t.log_interval == 0 or done == self.total_steps
                checkpoint_due = done % self.t.checkpoint_interval == 0 or done == end_step
                if log_due:
                    metrics = self.log_window(done, window_steps, time.perf_counter() - window_start)
                    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")
                    window_start, window_steps = time.perf_counter(), 0
                if done % self.t.eval_interval == 0 or done == self.total_steps:
                    eval_metrics = self.evaluate()
                    self.metrics.log(eval_metrics, step=done)
                    log.info("step %d: eval loss %.4f ppl %.2f", done, eval_metrics["eval/loss"],
                             eval_metrics["eval/perplexity"])
                    window_start = time.perf_counter()  # keep eval time out of tokens/s
                if log_due or checkpoint_due:
                    self.preempted = self.preemption.any_rank(self.device)
                if checkpoint_due or self.preempted:
                    path = save_checkpoint(self.engine, self.checkpoint_dir, done)
                    log.info("step %d: checkpoint %s", done, path)
                    window_start = time.perf_counter()
                if self.preempted:
                    log.info("stopping at step %d after preemption signal", done)
                    break

    def train_step(self, step: int) -> None:
        self.step_lr = self.engine.get_lr()[0]  # what this step trains with; the scheduler moves on after it
        step_load_LE = 0  # the router's choices per MoE layer and expert over the step's micro batches
        for micro_step in range(self.t.grad_accum):
            input_ids = self.data.train_micro_batch(
                step=step, micro_step=micro_step, rank=self.rank, world_size=self.world_size,
                micro_batch_size=self.t.micro_batch_size, grad_accum=self.t.grad_accum,
            ).to(self.device)
            out = self.engine(input_ids=input_ids, labels=input_ids)
            self.engine.backward(out.loss)
            if self.clips_gradients and self.engine.is_gradient_accumulation_boundary():
                self.grad_norm = clip_grad_norm(self.engine.module, self.cfg.optim.grad_clip)
            self.engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            self.window.add(out)
            step_load_LE = step_load_LE + out.router_demand
        if self.uses_expert_bias:  # one all_reduce: every rank moves the bias by the load of the global batch
            update_expert_bias(self.engine.module, step_load_LE)

    def log_window(self, step: int, steps: int, seconds: float) -> dict[str, float]:
        """Collective: reduce the window's sums in one all_reduce, log them, and on rank 0 the heatmap when due."""
        totals = self.window.reduce()
        tokens_per_s = self.tokens_per_step * steps / seconds
        achieved_flops = self.flops_per_token * tokens_per_s / self.world_size
        metrics = {f"train/{name}": value for name, value in totals.losses.items()}
        metrics.update({
            "train/lr": self.step_lr,
            "perf/tokens_per_s": tokens_per_s,
            "perf/flops_per_s_per_device": achieved_flops,
        })
        grad_norm = self.grad_norm if self.clips_gradients else self.engine.get_global_grad_norm()
        if grad_norm is not None:  # DeepSpeed keeps no global norm at ZeRO stage 0
            metrics["train/grad_norm"] = float(grad_norm)
        if self.peak_flops:
            metrics["perf/mfu"] = achieved_flops / self.peak_flops
        # The bias is the same on every rank (each applies the same update): a snapshot, not a window sum.
        metrics.update(routing_metrics(totals, self.moe_layer_ids, self.engine.module.expert_bias()))
        if len(self.data.names) > 1:  # the realised mixture
            for name, count in zip(self.data.names, self.mixture_counts.tolist()):
                metrics[f"data/{name}_fraction"] = count / int(self.mixture_counts.sum())
        self.mixture_counts = 0
        self.metrics.log(metrics, step=step)
        self.routing.observe(totals.received_LE, totals.demand_LE, totals.dropped_L)
        if self.rank == 0 and self.routing.due(step, last_step=step == self.total_steps):
            self.routing.write(step, self.metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over each store's eval rows (the first trainer.eval_batches x micro_batch_size
        blocks of its val split: the same rows at any world size and layout), eval/<name>/loss per store of a
        mixture. Eval never drops tokens, so a row's loss does not depend on its batch mates."""
        self.engine.eval()
        totals = torch.zeros(len(self.data.names), 2, dtype=torch.float64, device=self.device)  # loss sum, targets
        for component in range(len(self.data.names)):
            for input_ids_BS, num_rows in self.data.eval_micro_batches(
                    component, rank=self.rank, world_size=self.world_size, micro_batch_size=self.t.micro_batch_size,
                    max_batches=self.t.eval_batches):
                input_ids_BS = input_ids_BS.to(self.device)
                logits_BSV = self.engine(input_ids=input_ids_BS).logits
                # Summed here, over the eval rows only: the rows after them are padding that keeps this rank in step
                # with the others' all-to-alls, and a mean per batch would weigh short batches wrongly.
                loss_sum = F.cross_entropy(logits_BSV[:num_rows, :-1].flatten(0, 1).float(),
                                           input_ids_BS[:num_rows, 1:].flatten(), reduction="sum")
                totals[component, 0] += loss_sum.double()
                totals[component, 1] += num_rows * (input_ids_BS.shape[1] - 1)
        dist.all_reduce(totals)
        self.engine.train()
        loss = (totals[:, 0].sum() / totals[:, 1].sum()).item()
        metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 30.0))}
        if len(self.data.names) > 1:
            for name, (loss_sum, targets) in zip(self.data.names, totals.tolist()):
                metrics[f"eval/{name}/loss"] = loss_sum / targets
        return metrics
