"""Checkpoints through the DeepSpeed engine, plus what the engine does not keep: step and per-rank RNG."""

import logging
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine, checkpoint_dir: Path, step: int) -> Path:
    """Collective: every rank writes its shards (ZeRO partitions, its experts) and its RNG state."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, checkpoint_dir / tag / f"rng_rank{dist.get_rank():05d}.pt")
    dist.barrier()
    return checkpoint_dir / tag


def resolve_resume_dir(resume: str, checkpoint_dir: Path) -> Path | None:
    """`auto`: the run's own checkpoints if any; `none`: fresh start; anything else: a checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoint_dir if (checkpoint_dir / "latest").is_file() else None
    path = Path(resume)
    if not (path / "latest").is_file():
        raise ValueError(f"trainer.resume={resume!r}: no 'latest' file there; point it at a checkpoints folder "
                         "written by this recipe (run_dir/checkpoints) or use resume=auto / resume=none.")
    return path


def load_checkpoint(engine, resume_dir: Path) -> int:
    """Restore model, optimizer, LR schedule and RNG; return the step to continue from (the data position)."""
    load_path, client_state = engine.load_checkpoint(str(resume_dir))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint to load in {resume_dir}.")
    rng_file = Path(load_path) / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    step = int(client_state["step"])
    log.info("resumed from %s at step %d", load_path, step)
    return step
