"""The periodic work of a training run, each piece a small callback the Trainer calls after every step (OLMo-core's
pattern): metrics (`MetricsLogger`), expert-load heatmaps (`RoutingHeatmap`), evaluation (`Evaluator`), preemption
signals and Ctrl-C (`StopCheck`) and checkpoints (`Checkpointer`, which also keeps their number down).
`build_callbacks` wires them from a Recipe, in the order they run: the start-up header (`RunHeader`), the log, then
its heatmap, eval, the step's metrics record (`FlushMetrics`), the stop check, the checkpoint.

Every callback runs on every rank at the same step: their reductions and saves are collective.
"""

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import prune_checkpoints, save_checkpoint
from .config import TrainerConfig, global_batch_size
from .data import TrainingData
from .engine import resolve_precision
from .flops import active_params_per_token, flops_per_token, guess_peak_flops, total_params
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
        log.info(progress_line(trainer, metrics))


def progress_line(trainer: "Trainer", metrics: dict[str, float]) -> str:
    """The log step's line in train.log: what a person watching the run reads (W&B and metrics.jsonl have it all)."""
    parts = [f"step {trainer.step}/{trainer.total_steps}", f"loss {metrics['train/loss']:.4f}",
             f"aux {metrics['train/aux_loss']:.4f}", f"lr {metrics['train/lr']:.2e}"]
    if "train/grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['train/grad_norm']:.3f}")
    parts.append(f"{metrics['perf/tokens_per_s']:,.0f} tokens/s")
    if "perf/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
    parts.append(f"ETA {format_duration(trainer.eta_seconds())}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class RoutingHeatmap(Callback):
    """Rank 0 draws the expert-load heatmap of the log window (`MetricsLogger`) when the report is due."""

    def __init__(self, report: RoutingReport, sink: MetricsSink) -> None:
        self.report, self.sink = report, sink

    def pre_train(self, trainer: "Trainer") -> None:
        # After a resume the schedule goes on from the checkpoint's step: the job before drew the heatmaps up to it.
        self.report.last_reported = trainer.step

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


class FlushMetrics(Callback):
    """The step's metrics (train, routing, eval) are one record: written once every callback that logs has run,
    before a checkpoint (a resume cuts the history back to its checkpoint's step, `metrics.cut_metrics`)."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        self.sink.flush()


PREEMPT, INTERRUPT = 0, 1  # the flags StopCheck reduces across ranks
SAME_CTRL_C_S = 1.0  # a SIGINT this soon after the first is a launcher passing it on, not a second Ctrl-C


class StopCheck(Callback):
    """Stop with a checkpoint at a step boundary on Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (Slurm's warning before
    the time limit). A second Ctrl-C stops at once, without the checkpoint.

    The ranks must agree on the step to stop at, and a signal reaches them at different moments, so each step
    starts an all_reduce of this rank's flags on a CPU (gloo) group, without waiting for it, and reads the one
    started a step before: every rank stops after the same step, one step after the signal at most, and no step
    waits on the device or on the others (OLMo-core checks only every N steps for that reason).

    `trainer.stop_requested` is then "interrupt" (Ctrl-C on any rank: the job exits 0) or "preempt" (exit
    `MOE_PREEMPT_EXIT_CODE`, for Slurm's requeue)."""

    def __init__(self, rank: int, group=None) -> None:
        self.rank, self.group = rank, group
        self.flags = torch.zeros(2)
        self.interrupted_at = 0.0
        self.pending: tuple[torch.Tensor, dist.Work] | None = None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.flags[INTERRUPT]:
            # torchrun passes the terminal's Ctrl-C on to its workers, which had it already: one Ctrl-C, twice.
            if time.monotonic() - self.interrupted_at < SAME_CTRL_C_S:
                return
            self._say("second Ctrl-C: stopping now, without a checkpoint")
            os._exit(130)
        if signum == signal.SIGINT:
            self.interrupted_at = time.monotonic()
        if not self.flags.any():
            what = "Ctrl-C" if signum == signal.SIGINT else f"received {signal.Signals(signum).name}"
            self._say(f"{what}: stopping after this step with a checkpoint"
                      + (" (Ctrl-C again: stop at once, without it)" if signum == signal.SIGINT else ""))
        self.flags[INTERRUPT if signum == signal.SIGINT else PREEMPT] = 1

    def _say(self, message: str) -> None:
        # A signal handler may interrupt a log call: write the line directly, from rank 0 only.
        if self.rank == 0:
            os.write(2, f"{message}\n".encode())

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        last = trainer.step == trainer.end_step
        agreed = self._read() if self.pending is not None else None
        if agreed is None or not agreed.any():
            flags = self.flags.clone()
            self.pending = (flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
            if last:  # no step after this one: read it now, so the job's exit status says what stopped it
                agreed = self._read()
        if agreed is not None and agreed.any():
            trainer.stop_requested = "interrupt" if agreed[INTERRUPT] else "preempt"

    def _read(self) -> torch.Tensor:
        flags, work = self.pending
        work.wait()
        self.pending = None
        return flags


class Checkpointer(Callback):
    """Every `checkpoint_interval` steps, at the end of the job (`stop_after_steps`, the last step) and when a stop
    is requested: a checkpoint in run_dir/checkpoints (checkpoint.save_checkpoint, collective). Then only the
    newest `keep_last` and every `keep_every`-th stay (checkpoint.prune_checkpoints, rank 0)."""

    def __init__(self, checkpoint_dir: Path, t: TrainerConfig) -> None:
        self.checkpoint_dir, self.interval = checkpoint_dir, t.checkpoint_interval
        self.keep_last, self.keep_every = t.keep_last, t.keep_every

    def post_step(self, trainer: "Trainer", result: StepResult) -> None:
        if every(self.interval, trainer.step) or trainer.step == trainer.end_step or trainer.stop_requested:
            with trainer.paused():
                path = save_checkpoint(trainer.engine, self.checkpoint_dir, trainer.step)
                removed = []
                if trainer.rank == 0:
                    removed = prune_checkpoints(self.checkpoint_dir, self.keep_last, self.keep_every)
            note = f" (removed {', '.join(p.name for p in removed)}: trainer.keep_last={self.keep_last})" if removed \
                else ""
            log.info("step %d: checkpoint %s%s", trainer.step, path, note)


class RunHeader(Callback):
    """train.log's first lines: what runs where, so that a log read alone says what it is the log of."""

    def __init__(self, recipe: "Recipe", data: TrainingData, run_dir: Path) -> None:
        self.recipe, self.data, self.run_dir = recipe, data, run_dir

    def pre_train(self, trainer: "Trainer") -> None:
        if trainer.rank != 0:
            return
        for line in run_header(self.recipe, self.data, self.run_dir, trainer):
            log.info(line)


def run_header(recipe: "Recipe", data: TrainingData, run_dir: Path, trainer: "Trainer") -> list[str]:
    cfg, model = recipe.config, recipe.model
    t, world = cfg.trainer, recipe.world_size
    ep, dp = cfg.parallel.ep_size, world // cfg.parallel.ep_size
    resume = recipe.resume_from
    start = f"resumed from {resume.path} at step {resume.step}" if resume is not None else "fresh start"
    seq_len = cfg.data.seq_len
    batch = global_batch_size(t, world)
    stores = ", ".join(f"{c.name} ({c.store.path}, {c.store.train.num_tokens:,} train tokens)"
                       for c in data.components)
    return [
        f"run {run_dir}: {start}; steps {trainer.step} to {trainer.end_step} of {trainer.total_steps}",
        f"layout: {world} rank{'s' * (world > 1)}; dense weights data-parallel over all {world}, experts split "
        f"over ep_size {ep} and each replicated over {dp}; ZeRO stage {cfg.zero.stage}; "
        f"{resolve_precision(t.precision)}; {model.moe_backend} MoE layers",
        f"model: {total_params(model) / 1e6:,.1f}M parameters, {active_params_per_token(model) / 1e6:,.1f}M active "
        f"per token; {model.num_experts} experts, top {model.num_experts_per_tok}, "
        f"{len(model.moe_layer_indices)} MoE layers of {model.num_hidden_layers}",
        f"batch: {batch} sequences x {seq_len} tokens = {batch * seq_len:,} tokens per step (micro batch "
        f"{t.micro_batch_size} x grad_accum {t.grad_accum} x {world} ranks)",
        f"data: {stores}",
    ]


def build_callbacks(recipe: "Recipe", data: TrainingData, sink: MetricsSink, run_dir: Path) -> list[Callback]:
    """The recipe's periodic work, in the order it runs after each step."""
    t, model = recipe.config.trainer, recipe.model
    tokens_per_step = global_batch_size(t, recipe.world_size) * recipe.config.data.seq_len
    callbacks: list[Callback] = [MetricsLogger(sink, t, data, tokens_per_step,
                                               flops_per_token(model, recipe.config.data.seq_len),
                                               model.moe_layer_indices)]
    if t.heatmap_interval is not None:
        report = RoutingReport(run_dir / "routing", t.heatmap_interval, model.num_experts_per_tok,
                               model.moe_layer_indices)
        callbacks.append(RoutingHeatmap(report, sink))
    # The stop check's flags go over gloo: a CPU tensor, so reading them never waits on the device.
    stop_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return [RunHeader(recipe, data, run_dir), *callbacks, Evaluator(sink, t, data), FlushMetrics(sink),
            StopCheck(dist.get_rank(), stop_group), Checkpointer(run_dir / "checkpoints", t)]
