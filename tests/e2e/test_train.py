"""The real entry points as a user runs them: the deepspeed launcher, torchrun, the console command, Hydra overrides."""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_trained, free_port, overrides, run_command, torchrun, train_rows
from tests.wandb_records import history_and_config

TRAIN = REPO / "recipes" / "train.py"
pytestmark = pytest.mark.e2e


def deepspeed_launch(num_procs: int, args: list[str], check: bool = True):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    return run_command([launcher, "--num_gpus", str(num_procs), "--master_port", str(free_port()), str(TRAIN), *args],
                       check=check)


@pytest.mark.parametrize("zero", ["stage0", "stage1", "stage2_offload"])
def test_deepspeed_launcher_ep2(tmp_path, zero):
    run_dir = tmp_path / "run"
    # use_rts acts only with top-1 routing: with the tiny model's top-2 it changes nothing, and the run says so.
    proc = deepspeed_launch(2, overrides(run_dir, "parallel.ep_size=2", f"zero={zero}", "model.use_rts=true"))
    assert_trained(run_dir, steps=6)
    # Only rank 0 speaks: each eval and checkpoint line once, not once per rank; the warning once, before training.
    output = proc.stdout + proc.stderr
    for line in ("step 3: eval loss", "step 6: eval loss", "step 3: checkpoint", "step 6: checkpoint"):
        assert proc.stdout.count(line) == 1, (line, proc.stdout[-3000:])
    warning = "use_rts (Random Token Selection) acts only in DeepSpeed's top-1 gate"
    assert output.count(warning) == 1, output[-3000:]
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 2 * 1 * 2
    assert ds_config["zero_optimization"]["stage"] == int(zero[5])


def test_deepspeed_launcher_ep2_dp2_with_wandb_offline(tmp_path):
    run_dir = tmp_path / "run"
    deepspeed_launch(4, overrides(run_dir, "parallel.ep_size=2", "zero=stage2", "logging=offline",
                                  "trainer.grad_accum=2"))
    rows = assert_trained(run_dir, steps=6)
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 2 * 2 * 4

    history, config = history_and_config(run_dir)
    assert config["parallel"] == {"ep_size": 2} and config["zero"]["stage"] == 2
    logged = {row["_step"]: row for row in history if "train/loss" in row}
    assert sorted(logged) == sorted(rows)
    for step, row in logged.items():
        assert row["train/loss"] == pytest.approx(rows[step]["train/loss"])
        for key in ("train/lm_loss", "train/aux_loss", "train/z_loss", "train/lr", "train/grad_norm",
                    "perf/tokens_per_s", "routing/layer_1/expert_7", "routing/layer_1/dropped_fraction"):
            assert key in row, key
    evals = [row for row in history if "eval/loss" in row]
    assert [row["_step"] for row in evals] == [3, 6]
    assert all(row["eval/perplexity"] > 1 for row in evals)


def test_resume_gives_the_same_losses_as_one_run(tmp_path):
    common = ["parallel.ep_size=2", "zero=stage2", "trainer.checkpoint_interval=100"]
    whole = tmp_path / "whole"
    torchrun(TRAIN, 2, overrides(whole, *common))

    interrupted = tmp_path / "interrupted"
    torchrun(TRAIN, 2, overrides(interrupted, *common, "trainer.stop_after_steps=3"))
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert sorted(train_rows(interrupted)) == [1, 2, 3]
    # The second job goes through the installed console command, as a user's requeued job would.
    moe_train = shutil.which("moe-train", path=str(Path(sys.executable).parent))
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                 f"--master_port={free_port()}", moe_train, *overrides(interrupted, *common)])

    expected, resumed = train_rows(whole), train_rows(interrupted)
    assert sorted(resumed) == sorted(expected) == list(range(1, 7))
    for step in expected:
        for key in ("train/loss", "train/lm_loss", "train/aux_loss", "train/lr", "train/grad_norm"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)
    # The default lr 3e-3 with 2 warmup steps, then a cosine over steps 2-6 down to 0.1 of it.
    cosine = [0.1 + 0.45 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)]
    assert [expected[step]["train/lr"] for step in range(1, 7)] == pytest.approx(
        [3e-3 * f for f in [0.5, 1.0, *cosine]], rel=1e-12)


@pytest.mark.parametrize(
    "procs, args, message",
    [
        (1, ["parallel.ep_size=3"], "num_experts=8 is not divisible by ep_size=3"),
        (2, ["parallel.ep_size=4"], "parallel.ep_size=4 does not divide the world size 2"),
        (1, ["zero.stage=3"], "zero.stage=3 is not supported by DeepSpeed's native MoE"),
        (1, ["data.seq_len=512"], "data.seq_len=512 is longer than model.max_position_embeddings=256"),
        (1, ["model.vocab_size=1000"], "the tokenizer has 4096 tokens but model.vocab_size=1000"),
    ],
)
def test_bad_config_stops_with_one_message(tmp_path, procs, args, message):
    cli = overrides(tmp_path / "run", *args)
    if procs == 1:
        proc = run_command([sys.executable, str(TRAIN), *cli], check=False)
    else:
        proc = torchrun(TRAIN, procs, cli, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(message) == 1, output[-3000:]
    # torchrun itself prints a ChildFailedError traceback when a rank exits non-zero; no frame may come from here.
    ours = [f'File "{REPO / package}' for package in ("recipes", "moe_recipe", "moe_model")]
    assert not any(frame in output for frame in ours) and (procs > 1 or "Traceback" not in output), output[-3000:]
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_single_process_without_a_launcher(tmp_path):
    run_dir = tmp_path / "run"
    run_command([sys.executable, str(TRAIN), *overrides(run_dir, "trainer.max_steps=4", "zero=stage0")])
    assert_trained(run_dir, steps=4)


def test_launcher_local_rank_argument_is_not_a_hydra_override(monkeypatch):
    from recipes.train import strip_launcher_args

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["train.py", "--local_rank=3", "parallel.ep_size=2", "--local_rank", "1", "zero=stage2"]
    assert strip_launcher_args(argv) == ["train.py", "parallel.ep_size=2", "zero=stage2"]
    assert os.environ["LOCAL_RANK"] == "3"
