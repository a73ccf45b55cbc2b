"""benchmarks/gpu_check.sh without a GPU: its dry run lists the four steps and passes the checks a CPU can make, and
the summary judges the targets from a fabricated results dict (pass, miss, failed step)."""

import os
import subprocess
from pathlib import Path

from benchmarks.gpu_summary import render, target_verdicts

REPO = Path(__file__).resolve().parents[2]
STEPS = ["bench-h100", "bench-fine", "gpu-tests", "train-native", "train-autoep"]


def test_dry_run_lists_the_four_steps_and_its_checks_pass():
    env = {**os.environ, "GPU_CHECK_WORK": "/tmp/gpu_check_dry_run"}
    env.pop("GPU_CHECK_CPU_REHEARSAL", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = proc.stdout.splitlines()
    listing, checks = lines[:lines.index("checks:")], lines[lines.index("checks:") + 1:]
    commands = {line.split()[0]: line for line in listing if line.split() and line.split()[0] in STEPS}
    assert list(commands) == STEPS, proc.stdout
    assert "--preset h100 --backend deepspeed autoep" in commands["bench-h100"]
    assert "--preset fine" in commands["bench-fine"] and "--profile" in commands["bench-fine"]
    assert "-m pytest -m gpu" in commands["gpu-tests"]
    assert "deepspeed.launcher.runner --num_gpus 1" in commands["train-native"]
    assert "model=small" in commands["train-native"] and "trainer.precision=bf16" in commands["train-native"]
    assert "model.moe_backend=autoep model.drop_tokens=false" in commands["train-autoep"]
    checks = {line.split(":")[0].strip(): line for line in checks if line.startswith("  ")}
    # The wheels are built on demand (scripts/build_gpu_wheels.sh), so a checkout may lack them; the rest must pass.
    for name in ["presets", "train-native overrides", "train-autoep overrides", "gpu tests"]:
        assert ": ok" in checks[name], proc.stdout + proc.stderr
    assert "test_peak_memory_within_15_percent_on_gpu" in checks["gpu tests"]
    assert "test_backends_agree_on_cuda" in checks["gpu tests"]
    assert proc.returncode == (0 if ": ok" in checks["wheels"] else 1), proc.stdout


def bench(ours: float, autoep: float, reference: float, block_pct: float | None) -> dict:
    def step(variant, tokens_per_s):
        return {"variant": variant, "tokens_per_s": tokens_per_s, "step_ms": 1e3, "mfu_pct": None,
                "peak_mem_gib": None,
                "top_kernels": [{"name": f"{variant}_gemm", "calls": 8, "self_ms_per_step": 5.0, "self_pct": 60.0}]}

    return {
        "shape": {"layers": 8},
        "train_step": [step("ours", ours), step("ours-autoep", autoep), step("hf-grouped_mm", reference)],
        "moe_block": [{"variant": v, "fwd_bwd_ms": 1.0, "tflops": 1.0, "pct_peak": block_pct}
                      for v in ("ours", "ours-autoep", "hf-grouped_mm")],
    }


def results(**overrides) -> dict:
    steps = [{"name": name, "rc": 0, "seconds": 10.0, "timeout_s": 100, "command": name, "status": "ok"}
             for name in STEPS]
    base = {
        "mode": "gpu", "env": {"device": "NVIDIA H200"}, "steps": steps,
        "bench": {"h100": bench(ours=1200.0, autoep=1600.0, reference=1000.0, block_pct=45.0),
                  "fine": bench(ours=500.0, autoep=1100.0, reference=1000.0, block_pct=20.0)},
        "gpu_tests": [],
        "planner_peak": [{"case": "zero.stage=0", "planned_gib": 10.0, "measured_gib": 9.0, "error": 1 / 9},
                         {"case": "zero.stage=1", "planned_gib": 8.0, "measured_gib": 10.0, "error": -0.2}],
        "training": {"native": None, "autoep": None},
    }
    return {**base, **overrides}


def verdicts_by_target(res: dict) -> dict[tuple[str, str], dict]:
    return {(v["preset"], v["target"].split(" >=")[0].split(" within")[0]): v for v in target_verdicts(res)}


def test_verdicts_pass_and_miss():
    v = verdicts_by_target(results())
    assert v["h100", "native backend"]["verdict"] == "pass" and v["h100", "native backend"]["value"] == 1.2
    assert v["h100", "best backend"]["verdict"] == "pass" and v["h100", "best backend"]["value"] == 1.6
    assert "ours-autoep" in v["h100", "best backend"]["detail"]
    assert v["h100", "MoE block fwd+bwd"]["verdict"] == "pass"
    assert v["fine", "native backend"]["verdict"] == "MISS" and v["fine", "native backend"]["value"] == 0.5
    assert v["fine", "best backend"]["verdict"] == "MISS"  # 1.1x < 1.5x
    assert v["fine", "MoE block fwd+bwd"]["verdict"] == "MISS"
    # The worst case decides: -20% is outside 15% although +11% is inside.
    assert v["-", "planner peak memory"]["verdict"] == "MISS" and round(v["-", "planner peak memory"]["value"]) == 20


def test_summary_profiles_only_the_preset_that_missed():
    summary = render(results())
    assert "| h100 | native backend >= 1.0x hf-grouped_mm tokens/s | 1.20 x | pass |" in summary
    assert "## Where the time goes: preset `fine`, `ours` (slowest dropless variant)" in summary
    assert "`ours_gemm`" in summary
    assert "Where the time goes: preset `h100`" not in summary


def test_failed_and_timed_out_steps_leave_targets_unmeasured():
    res = results()
    res["bench"]["h100"] = None
    res["planner_peak"] = []
    for step in res["steps"]:
        if step["name"] == "bench-h100":
            step.update(rc=124, status="timed out after 100 s")
        if step["name"] == "gpu-tests":
            step.update(rc=1, status="failed (exit 1)")
    v = verdicts_by_target(res)
    assert v["h100", "native backend"]["verdict"] == "not measured: step bench-h100 timed out after 100 s"
    assert v["h100", "MoE block fwd+bwd"]["value"] is None
    assert v["-", "planner peak memory"]["verdict"] == "not measured: step gpu-tests failed (exit 1)"
    summary = render(res)
    assert "- `bench-h100`: timed out after 100 s" in summary and "- `gpu-tests`: failed (exit 1)" in summary
    assert "| native | not measured: no metrics.jsonl |" in summary


def test_hf_grouped_mm_missing_is_not_a_pass():
    res = results()
    res["bench"]["h100"]["train_step"] = [r for r in res["bench"]["h100"]["train_step"]
                                          if r["variant"] != "hf-grouped_mm"]
    v = verdicts_by_target(res)
    assert v["h100", "native backend"]["verdict"] == "not measured: hf-grouped_mm did not run"


def test_training_figures_survive_a_timeout_in_the_final_save():
    res = results()
    res["training"]["native"] = {"windows": [{"step": 10}, {"step": 20}, {"step": 30}], "last_step": 30,
                                 "tokens_per_s": 123456.0, "mfu_pct": 21.5, "loss": 6.25}
    next(s for s in res["steps"] if s["name"] == "train-native").update(rc=124, status="timed out after 75 s")
    summary = render(res)
    assert "| native | logged at steps 10, 20, 30; step timed out after 75 s | 123,456 | 21.5 | 6.250 |" in summary
    assert "- `train-native`: timed out after 75 s" in summary
