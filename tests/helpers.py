"""Helpers shared by the tests: processes (a free port, torchrun, a timeout, the output on failure), the recipe's
config composed as the entry point composes it, and what a training run leaves in its run directory."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env() -> dict[str, str]:
    """The environment of a test's child process: one thread, quiet W&B, no inherited rank."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def run_command(cmd: list[str], timeout: int = 600, cwd: Path = REPO, env=None, check: bool = True):
    proc = subprocess.run(cmd, cwd=cwd, env=env or process_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(script: Path, nprocs: int, args: list[str], timeout: int = 600, check: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args]
    return run_command(cmd, timeout=timeout, check=check)


def train_rows(run_dir: Path) -> dict[int, dict]:
    """The training record of each step in run_dir/metrics.jsonl."""
    from moe_recipe.metrics import read_metrics

    rows = {}
    for row in read_metrics(run_dir):
        if "train/loss" in row:
            rows[row["step"]] = row
    return rows


def compose_recipe(*overrides: str):
    """conf/ and Hydra overrides -> the typed RecipeConfig, as load_recipe composes and types it (not validated)."""
    from moe_recipe.recipe import compose, typed_config

    return typed_config(compose(overrides))[0]


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        f"trainer.run_dir={run_dir}",
        f"data.cache_dir={run_dir.parent / 'data-cache'}",
        "trainer.max_steps=6",
        "optim.warmup_steps=2",
        "trainer.micro_batch_size=2",
        "trainer.log_interval=1",
        "trainer.eval_interval=3",
        "trainer.eval_batches=2",
        "trainer.checkpoint_interval=3",
        *extra,
    ]


def assert_trained(run_dir: Path, steps: int, num_experts: int = 8, moe_layers: int = 2) -> dict[int, dict]:
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, steps + 1))
    assert rows[steps]["train/loss"] < rows[1]["train/loss"]
    for row in rows.values():
        shares = [row[f"routing/layer_0/expert_{e}"] for e in range(num_experts)]
        assert sum(shares) == pytest.approx(1.0)
        assert 0.0 <= row["routing/layer_0/dropped_fraction"] < 1.0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{steps:08d}"
    expert_files = list((checkpoints / f"step_{steps:08d}").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(expert_files) == num_experts * moe_layers
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    return rows
