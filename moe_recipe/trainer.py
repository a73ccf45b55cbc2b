"""The training loop: the step function (train_step.py) over the steps of this job, and the callbacks after each.

Only rank 0 prints (its logging level is INFO, the other ranks' WARNING). The progress bar is rank 0's too, and
only on a terminal: in a file (Slurm's output, a redirect) its carriage returns are noise, and the log's line per log
step (callbacks.MetricsLogger) says the same.
"""

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moe_model.routing import MoeRoutingMetrics

from .callbacks import Callback
from .checkpoint import ResumePoint, load_checkpoint
from .config import TrainerConfig, global_batch_size
from .data import TrainingData
from .train_step import train_step

log = logging.getLogger(__name__)


class Trainer:
    """Runs steps `resume_from.step` (0 for a fresh run) to `total_steps`, or `stop_after_steps` of them.

    `grad_clip`: the norm the recipe clips to itself (`engine.recipe_clips_gradients`), else None (DeepSpeed clips).
    The callbacks read the trainer's state: `step` (steps done), `total_steps`, `end_step` (this job's last), and
    set `stop_requested` ("interrupt": Ctrl-C, "preempt": SIGTERM/SIGUSR1; callbacks.StopCheck) and `routing_window`
    (the last log window's routing metrics).
    """

    def __init__(self, engine, t: TrainerConfig, data: TrainingData, *, total_steps: int, callbacks: list[Callback],
                 grad_clip: float | None = None, resume_from: ResumePoint | None = None) -> None:
        self.engine, self.t, self.data = engine, t, data
        self.total_steps, self.callbacks, self.grad_clip = total_steps, callbacks, grad_clip
        self.resume_from = resume_from
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = engine.device
        self.global_batch_size = global_batch_size(t, self.world_size)
        self.step = self.end_step = 0
        self.stop_requested: str | None = None
        self.routing_window: tuple[int, MoeRoutingMetrics] | None = None
        self.progress: tqdm | None = None
        self._clock_start, self._paused_s = time.perf_counter(), 0.0
        self._fit_start, self._first_step = time.perf_counter(), 0

    def fit(self) -> None:
        self.step = load_checkpoint(self.engine, self.resume_from) if self.resume_from is not None else 0
        if self.step >= self.total_steps:
            log.info("nothing to do: the checkpoint is at step %d of %d", self.step, self.total_steps)
            return
        self.end_step = self.total_steps
        if self.t.stop_after_steps is not None:
            self.end_step = min(self.end_step, self.step + self.t.stop_after_steps)
        # Log lines go through tqdm.write while the bar is up, so they do not tear it.
        show_bar = self.rank == 0 and sys.stderr.isatty()
        with logging_redirect_tqdm(), tqdm(total=self.total_steps, initial=self.step, disable=not show_bar,
                                           desc="train", dynamic_ncols=True) as self.progress:
            self.engine.train()
            for callback in self.callbacks:
                callback.pre_train(self)
            self._fit_start, self._first_step = time.perf_counter(), self.step
            while self.step < self.end_step and not self.stop_requested:
                result = train_step(self.engine, self.micro_batches(self.step), self.grad_clip)
                self.step += 1
                self.progress.update(1)
                for callback in self.callbacks:
                    callback.post_step(self, result)
        if self.stop_requested:
            log.info("stopped at step %d (%s); the same command resumes from its checkpoint", self.step,
                     "Ctrl-C" if self.stop_requested == "interrupt" else "preemption signal")

    def micro_batches(self, step: int) -> Iterator[torch.Tensor]:
        """This rank's micro batches of global batch `step`."""
        for micro_step in range(self.t.grad_accum):
            yield self.data.train_micro_batch(
                step=step, micro_step=micro_step, rank=self.rank, world_size=self.world_size,
                micro_batch_size=self.t.micro_batch_size, grad_accum=self.t.grad_accum,
            ).to(self.device)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training time: `window_seconds` leaves it out (eval, checkpoints, logging)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - start

    def eta_seconds(self) -> float:
        """Wall time to `end_step` at this job's pace so far (evals and checkpoints included)."""
        done = self.step - self._first_step
        return (time.perf_counter() - self._fit_start) / max(done, 1) * (self.end_step - self.step)

    def window_seconds(self) -> float:
        """Training time since the last call (wall time, less the paused time), and start the next window."""
        now = time.perf_counter()
        seconds = now - self._clock_start - self._paused_s
        self._clock_start, self._paused_s = now, 0.0
        return seconds
