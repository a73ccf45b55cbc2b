"""The periodic work of a training run, each piece a small callback the Trainer calls after every step (OLMo-core's
pattern): metrics (`MetricsLogger`), expert-load heatmaps (`RoutingHeatmap`), evaluation (`Evaluator`), preemption
signals (`PreemptionCheck`) and checkpoints (`Checkpointer`). `build_callbacks` wires them from a Recipe, in the
order they run: the log, then its heatmap, eval, the signal check, the checkpoint.

Every callback runs on every rank at the same step: their reductions and saves are collective.
"""

import logging
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .config import TrainerConfig, global_batch_size
from .data import TrainingData
from .flops import flops_per_token, guess_peak_flops
from .metrics import LossWindow, MetricsSink
from .routing_report import RoutingReport, routing_metrics
from .train_step import StepResult

if TYPE_CHECKING:
    from .recipe import Recipe
    from .trainer import Trainer

log = logging.getLogger(__name__)


class Callback:
    """Hooks the Trainer calls; `trainer.step` is the number of steps done."""

    def pre_train(self, trainer: "Trainer") -> None:
        """Before the first step of this job (after a resume: the checkpoint is loaded)."""

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        """After each optimizer step."""


def every(interval: int | None, step: int) -> bool:
    return interval is not None and step % interval == 0


class MetricsLogger(Callback):
    """Every `log_interval` steps and at the last: the window's losses, lr, grad norm, throughput, the routers'
    metrics and a data mixture's realised fractions, to the metrics sink. Collective (two all_reduces: the losses,
    the routers')."""

    def __init__(self, sink: MetricsSink, t: TrainerConfig, data: TrainingData, tokens_per_step: int,
                 flops_per_token: float, moe_layer_ids: list[int]) -> None:
        self.sink, self.log_interval, self.data = sink, t.log_interval, data
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = t.peak_flops_per_device or guess_peak_flops()
        self.moe_layer_ids = moe_layer_ids  # metrics name MoE layers by their decoder index
        self.window: LossWindow | None = None
        self.window_steps = 0
        self.mixture_counts = 0  # samples per store of a mixture in the window, the same on every rank

    def pre_train(self, trainer: "Trainer") -> None:
        self.window = LossWindow(trainer.device)
        trainer.window_seconds()  # start the clock

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        self.window.add(result.losses)
        self.window_steps += 1
        self.mixture_counts = self.mixture_counts + self.data.step_counts(trainer.step - 1, trainer.global_batch_size)
        if every(self.log_interval, trainer.step) or trainer.step == trainer.total_steps:
            self.log(trainer, result)

    def log(self, trainer: "Trainer", result: StepResult) -> None:
        tokens_per_s = self.tokens_per_step * self.window_steps / trainer.window_seconds()
        with trainer.paused():  # the log's own reductions count for no window
            self._log(trainer, result, tokens_per_s)

    def _log(self, trainer: "Trainer", result: StepResult, tokens_per_s: float) -> None:
        model = trainer.engine.module
        achieved_flops = self.flops_per_token * tokens_per_s / trainer.world_size
        metrics = {f"train/{name}": value for name, value in self.window.reduce().items()}
        metrics.update({"train/lr": result.lr, "perf/tokens_per_s": tokens_per_s,
                        "perf/flops_per_s_per_device": achieved_flops})
        if result.grad_norm is not None:  # DeepSpeed keeps no global norm at ZeRO stage 0
            metrics["train/grad_norm"] = float(result.grad_norm)
        if self.peak_flops:
            metrics["perf/mfu"] = achieved_flops / self.peak_flops
        routing = model.routing_metrics(reset=True)
        # The bias is the same on every rank (each applies the same update): a snapshot, not a window sum.
        metrics.update(routing_metrics(routing, self.moe_layer_ids, model.expert_bias()))
        if len(self.data.names) > 1:  # the realised mixture
            for name, count in zip(self.data.names, self.mixture_counts.tolist()):
                metrics[f"data/{name}_fraction"] = count / int(self.mixture_counts.sum())
        self.mixture_counts, self.window_steps = 0, 0
        self.sink.log(metrics, step=trainer.step)
        trainer.routing_window = (trainer.step, routing)
        trainer.progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}")


class RoutingHeatmap(Callback):
    """Rank 0 draws the expert-load heatmap of the log window (`MetricsLogger`) when the report is due."""

    def __init__(self, report: RoutingReport, sink: MetricsSink) -> None:
        self.report, self.sink = report, sink

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        if trainer.routing_window is None or trainer.routing_window[0] != trainer.step:
            return
        routing = trainer.routing_window[1]
        self.report.observe(routing.received_LE, routing.demand_LE, routing.dropped_L)
        if trainer.rank == 0 and self.report.due(trainer.step, last_step=trainer.step == trainer.total_steps):
            self.report.write(trainer.step, self.sink)


class Evaluator(Callback):
    """Every `eval_interval` steps and at the last: `evaluate`."""

    def __init__(self, sink: MetricsSink, t: TrainerConfig, data: TrainingData) -> None:
        self.sink, self.interval, self.data = sink, t.eval_interval, data
        self.micro_batch_size, self.eval_batches = t.micro_batch_size, t.eval_batches

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        if every(self.interval, trainer.step) or trainer.step == trainer.total_steps:
            with trainer.paused():  # eval time is not training time (tokens/s)
                metrics = evaluate(trainer.engine, self.data, micro_batch_size=self.micro_batch_size,
                                   eval_batches=self.eval_batches)
            self.sink.log(metrics, step=trainer.step)
            log.info("step %d: eval loss %.4f ppl %.2f", trainer.step, metrics["eval/loss"],
                     metrics["eval/perplexity"])


@torch.no_grad()
def evaluate(engine, data: TrainingData, *, micro_batch_size: int, eval_batches: int) -> dict[str, float]:
    """Collective: the mean next-token loss over each store's eval rows, the first eval_batches x micro_batch_size
    blocks of its val split: the same rows at any world size and layout, eval/<name>/loss per store of a mixture.
    Eval never drops tokens, so a row's loss does not depend on its batch mates."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    engine.eval()
    totals = torch.zeros(len(data.names), 2, dtype=torch.float64, device=engine.device)  # loss sum, targets
    for component in range(len(data.names)):
        for input_ids_BS, num_rows in data.eval_micro_batches(component, rank=rank, world_size=world_size,
                                                              micro_batch_size=micro_batch_size,
                                                              max_batches=eval_batches):
            input_ids_BS = input_ids_BS.to(engine.device)
            logits_BSV = engine(input_ids=input_ids_BS).logits
            # Summed here, over the eval rows only: the rows after them are padding that keeps this rank in step
            # with the others' all-to-alls, and a mean per batch would weigh short batches wrongly.
            loss_sum = F.cross_entropy(logits_BSV[:num_rows, :-1].flatten(0, 1).float(),
                                       input_ids_BS[:num_rows, 1:].flatten(), reduction="sum")
            totals[component, 0] += loss_sum.double()
            totals[component, 1] += num_rows * (input_ids_BS.shape[1] - 1)
    dist.all_reduce(totals)
    engine.train()
    loss = (totals[:, 0].sum() / totals[:, 1].sum()).item()
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 30.0))}
    if len(data.names) > 1:
        for name, (loss_sum, targets) in zip(data.names, totals.tolist()):
            metrics[f"eval/{name}/loss"] = loss_sum / targets
    return metrics


class PreemptionCheck(Callback):
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM: checkpoint at the next log or checkpoint step
    and stop. Checked only there, where the ranks synchronize anyway (OLMo-core's cancel-check interval): a check
    every step would add an all_reduce and a device-to-host sync to every step. Slurm's warning
    (`--signal=USR1@600` in launch/) must therefore leave time for `trainer.log_interval` steps and a checkpoint."""

    def __init__(self, t: TrainerConfig) -> None:
        self.intervals = (t.log_interval, t.checkpoint_interval)
        self.received = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint and stop at the next log or checkpoint step", signum)
        self.received = True

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        step = trainer.step
        if any(every(interval, step) for interval in self.intervals) or step in (trainer.total_steps, trainer.end_step):
            # Collective: ranks may see the signal at different steps; they must agree on where to stop.
            flag = torch.tensor([float(self.received)], device=trainer.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                trainer.stop_requested = True


class Checkpointer(Callback):
    """Every `checkpoint_interval` steps, at the end of the job (`stop_after_steps`, the last step) and when a stop
    is requested (preemption): a checkpoint in run_dir/checkpoints (checkpoint.save_checkpoint, collective)."""

    def __init__(self, checkpoint_dir: Path, t: TrainerConfig) -> None:
        self.checkpoint_dir, self.interval = checkpoint_dir, t.checkpoint_interval

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        if every(self.interval, trainer.step) or trainer.step == trainer.end_step or trainer.stop_requested:
            with trainer.paused():
                path = save_checkpoint(trainer.engine, self.checkpoint_dir, trainer.step)
            log.info("step %d: checkpoint %s", trainer.step, path)


def build_callbacks(recipe: "Recipe", data: TrainingData, sink: MetricsSink, run_dir: Path) -> list[Callback]:
    """The recipe's periodic work, in the order it runs after each step."""
    t, model = recipe.config.trainer, recipe.model
    tokens_per_step = global_batch_size(t, recipe.world_size) * recipe.config.data.seq_len
    callbacks = [MetricsLogger(sink, t, data, tokens_per_step, flops_per_token(model, recipe.config.data.seq_len),
                               model.moe_layer_indices)]
    if t.heatmap_interval is not None:
        report = RoutingReport(run_dir / "routing", t.heatmap_interval, model.num_experts_per_tok,
                               model.moe_layer_indices)
        callbacks.append(RoutingHeatmap(report, sink))
    return [*callbacks, Evaluator(sink, t, data), PreemptionCheck(t), Checkpointer(run_dir / "checkpoints", t)]
