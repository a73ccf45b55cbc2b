"""Training metrics: the step losses summed on each rank over a log window and reduced in one collective
(`LossWindow`; the routers reduce their own numbers, `MoeForCausalLM.routing_metrics`), then written by rank 0 to a
JSONL file in the run directory and W&B (`MetricsSink`); `read_metrics` reads the file back.

One history per run directory, however often it was resumed: `run_dir/metrics.jsonl` holds one record per logged
step, in step order (train/*, perf/*, routing/*, data/* and, at eval steps, eval/* in the same record). A resumed
job first cuts the file back to its checkpoint's step (the steps after it are trained again), and W&B keeps one run
(`run_dir/wandb_id.txt`) whose steps only go up: a step W&B already holds from the job before is not sent again (a
resume replays those steps bit for bit at the same layout).
"""

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import LoggingConfig
from .files import write_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
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


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a run's metrics file (a run directory or the file itself), in the order written: each a dict
    with "step" and the metrics logged at it. A last line cut short by a crash is left out."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    lines = path.read_text().splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):  # the write a crash interrupted
                break
            raise ValueError(f"{path}:{number} is not a JSON record: {line[:80]!r}") from None
    return records


def cut_metrics(path: Path, step: int) -> int:
    """Keep the records of steps up to `step` (the step a job resumes from): the rest are trained again. Atomic
    (`files.write_atomic`: a file beside it, synced, renamed over it). Returns the last step the file held (0 if
    none)."""
    if not path.exists():
        return 0
    records = read_metrics(path)
    last_step = max((record["step"] for record in records), default=0)
    if last_step <= step and len(records) == len(path.read_text().splitlines()):
        return last_step
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records if record["step"] <= step))
    return last_step


def start_detached_wandb_service() -> None:
    """W&B's service process (wandb-core), started outside this process's tree, for wandb.init to connect to.

    DeepSpeed's launcher answers Ctrl-C by sending SIGTERM to every rank and to everything the ranks started: a
    wandb-core of rank 0's own would die before the run's last records are written, and W&B would print tracebacks.
    `wandb beta core start` (a beta CLI, checked with wandb 0.31) leaves a service that only its idle timeout ends,
    handed over through WANDB_SERVICE. Where it cannot start, wandb.init starts its own as usual."""
    if os.environ.get("WANDB_SERVICE"):
        return
    proc = subprocess.run([sys.executable, "-m", "wandb", "beta", "core", "start", "--idle-timeout", "2m"],
                          capture_output=True, text=True)
    token = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    if token:
        os.environ["WANDB_SERVICE"] = token[0]
    else:
        log.warning("could not start a detached W&B service (%s); W&B may lose its last records on Ctrl-C",
                    proc.stderr.strip().splitlines()[-1:] or proc.returncode)


class MetricsSink:
    """Where metrics and images go: a JSONL file in the run directory and W&B, both written by rank 0 only.

    Everything logged at one step becomes one record: `log` collects, `flush` (the `FlushMetrics` callback, at the
    end of each step) writes it. `resume_step`: the step this job starts from (0 for a fresh run)."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, run_config: dict[str, Any], enabled: bool,
                 resume_step: int = 0):
        self.enabled = enabled
        self._wandb_run = None
        self._pending: dict[str, Any] = {}
        if not enabled:
            return
        # W&B holds the steps of the jobs before this one up to here, and takes none at or below it again.
        self._wandb_has_through = cut_metrics(run_dir / METRICS_FILE, resume_step)
        self.jsonl = open(run_dir / METRICS_FILE, "a")
        if cfg.wandb_mode != "disabled":
            import wandb

            start_detached_wandb_service()
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
        if self._pending and self._pending["step"] != step:
            self.flush()
        self._pending = {"step": step, **self._pending, **metrics}

    def flush(self) -> None:
        """Write the step's record: a line of the JSONL file, and one W&B history row."""
        if not self.enabled or not self._pending:
            return
        record, self._pending = self._pending, {}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record.pop("step")
        if self._wandb_run is not None and step > self._wandb_has_through:
            self._wandb_run.log(record, step=step)

    def log_image(self, name: str, path: Path, step: int, caption: str | None = None) -> None:
        """An image file already written (a PNG in the run directory): W&B uploads it; the JSONL holds numbers only."""
        if self._wandb_run is not None and step > self._wandb_has_through:
            import wandb

            # commit=False: it joins the step's history row, which `flush` commits.
            self._wandb_run.log({name: wandb.Image(str(path), caption=caption)}, step=step, commit=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        self.jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
