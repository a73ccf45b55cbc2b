"""Where metrics go: a JSONL file in the run directory and W&B, both written by rank 0 only."""

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from .config import LoggingConfig

log = logging.getLogger(__name__)


class MetricsSink:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.wandb_mode != "disabled":
            import wandb

            # One W&B run per run directory: a resumed job continues the same W&B run.
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(
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
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
