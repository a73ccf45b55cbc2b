"""What a long run leaves behind, piece by piece: the metrics history (one record per step, cut back on resume),
checkpoint retention (a kill while deleting leaves nothing resume could take), the stop on Ctrl-C and the header's
parameter count. The same pieces run together under the launcher in tests/e2e/test_long_runs.py."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_recipe.checkpoint import DELETING, MANIFEST, list_checkpoints, prune_checkpoints
from moe_recipe.config import LoggingConfig
from moe_recipe.flops import total_params
from moe_recipe.metrics import MetricsSink, cut_metrics, read_metrics
from tests.helpers import REPO


def write_lines(path: Path, *records: dict, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_read_metrics_leaves_out_a_last_line_cut_short(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", {"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5},
                tail='{"step": 3, "train/lo')
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]


def test_read_metrics_refuses_a_damaged_line_inside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_cut_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, *({"step": s, "train/loss": 1.0 / s} for s in range(1, 8)), tail='{"step": 8')
    assert cut_metrics(path, 4) == 7
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert path.read_text().endswith("\n") and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert cut_metrics(tmp_path / "none.jsonl", 4) == 0


def test_the_sink_writes_one_record_per_step_and_a_resume_cuts_the_rest(tmp_path):
    off = LoggingConfig(wandb_mode="disabled")
    sink = MetricsSink(tmp_path, off, "run", {}, enabled=True)
    for step in (1, 2, 3):
        sink.log({"train/loss": float(step)}, step=step)
        if step == 2:
            sink.log({"eval/loss": 0.5}, step=step)
        sink.flush()
    sink.log({"train/loss": 4.0}, step=4)
    sink.close()  # writes the pending step
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0, "eval/loss": 0.5},
                                      {"step": 3, "train/loss": 3.0}, {"step": 4, "train/loss": 4.0}]
    sink = MetricsSink(tmp_path, off, "run", {}, enabled=True, resume_step=2)
    sink.log({"train/loss": 3.5}, step=3)
    sink.close()
    assert [(r["step"], r.get("train/loss")) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.5)]


def fake_checkpoints(folder: Path, steps: list[int], latest: int) -> None:
    for step in steps:
        (folder / f"step_{step:08d}").mkdir(parents=True)
        (folder / f"step_{step:08d}" / MANIFEST).write_text(json.dumps({"step": step}))
        (folder / f"step_{step:08d}" / "weights.bin").write_bytes(b"x" * 100)
    (folder / "latest").write_text(f"step_{latest:08d}")


def kept(folder: Path) -> list[int]:
    return [int(path.name.removeprefix("step_")) for path in list_checkpoints(folder)]


def test_retention_keeps_the_newest_the_milestones_and_latest(tmp_path):
    fake_checkpoints(tmp_path, list(range(1, 11)), latest=10)
    (tmp_path / "step_00000011.incomplete").mkdir()  # being written
    removed = prune_checkpoints(tmp_path, keep_last=3, keep_every=5)
    assert kept(tmp_path) == [5, 8, 9, 10] and len(removed) == 6
    assert (tmp_path / "step_00000011.incomplete").is_dir()
    # `latest` is never removed, even when it is not among the newest (a save that died before moving it on).
    fake_checkpoints(tmp_path, [11, 12], latest=9)
    prune_checkpoints(tmp_path, keep_last=1)
    assert kept(tmp_path) == [9, 12]
    assert prune_checkpoints(tmp_path, keep_last=None) == [] and kept(tmp_path) == [9, 12]


def test_a_kill_while_deleting_leaves_only_complete_checkpoints(tmp_path):
    fake_checkpoints(tmp_path, [1, 2, 3, 4], latest=4)
    for i in range(50):
        (tmp_path / "step_00000001" / f"shard_{i}.bin").write_bytes(b"y" * 10)
    # The deletion dies (SIGKILL) half way through the files of the first checkpoint it removes.
    script = textwrap.dedent(f"""
        import os, shutil, signal
        from pathlib import Path
        from moe_recipe import checkpoint
        def dying_rmtree(path, *args, **kwargs):
            for i, file in enumerate(sorted(Path(path).iterdir())):
                if i == 20:
                    os.kill(os.getpid(), signal.SIGKILL)
                file.unlink()
        checkpoint.shutil.rmtree = dying_rmtree
        checkpoint.prune_checkpoints(Path({str(tmp_path)!r}), keep_last=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / f"step_00000001{DELETING}").is_dir()  # half deleted, under a name no reader takes
    assert kept(tmp_path) == [2, 3, 4]
    prune_checkpoints(tmp_path, keep_last=2)  # the next save's prune finishes the job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_a_second_ctrl_c_stops_at_once_and_a_forwarded_one_does_not(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys, time
        import torch.distributed as dist
        from moe_recipe.callbacks import StopCheck
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1],
                                rank=0, world_size=1)
        check = StopCheck(rank=0)
        trainer = type("T", (), {"step": 1, "end_step": 100, "stop_requested": None})()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher passing the same Ctrl-C on
        for step in (1, 2):
            trainer.step = step
            check.post_step(trainer, None)
            print(step, trainer.stop_requested, flush=True)
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGINT)  # a person pressing Ctrl-C again
        time.sleep(5)
        print("still running", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    # The flags are read a step late: the stop is agreed after step 2, every rank alike.
    assert [line for line in proc.stdout.splitlines() if "accelerator" not in line] == ["1 None", "2 interrupt"]
    assert proc.stderr.count("Ctrl-C: stopping after this step") == 1 and "second Ctrl-C" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides", [{}, {"num_shared_experts": 1, "first_k_dense_replace": 1},
                                       {"tie_word_embeddings": True}])
def test_total_params_counts_the_model(tiny_model, overrides):
    model = tiny_model(**overrides)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert total_params(model.config) == sum(p.numel() for p in model.parameters()) - norms


def test_progress_line_says_what_a_person_watches():
    from moe_recipe.callbacks import progress_line

    trainer = SimpleNamespace(step=120, total_steps=200, eta_seconds=lambda: 3725.0)
    metrics = {"train/loss": 5.81234, "train/aux_loss": 0.0123, "train/lr": 3e-4, "train/grad_norm": 0.7,
               "perf/tokens_per_s": 12345.6, "perf/mfu": 0.4123}
    assert progress_line(trainer, metrics) == ("step 120/200 | loss 5.8123 | aux 0.0123 | lr 3.00e-04 | "
                                               "grad_norm 0.700 | 12,346 tokens/s | MFU 41.2% | ETA 1h02m")
    del metrics["perf/mfu"], metrics["train/grad_norm"]
    trainer.eta_seconds = lambda: 75.0
    assert progress_line(trainer, metrics).endswith("| lr 3.00e-04 | 12,346 tokens/s | ETA 1m15s")
