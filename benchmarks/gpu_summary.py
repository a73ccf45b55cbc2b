"""Results of benchmarks/gpu_check.sh: collect what its steps left in the work folder, judge the targets, write
results.json and summary.md, and copy the raw files to the output folder (at most 8 files: the device tool's limit).

    python -m benchmarks.gpu_summary env                          # the environment as JSON (imports torch)
    python -m benchmarks.gpu_summary summarize --work W --out O   # W: gpu_check.sh's work folder

Only the standard library (but for `env`), so the summary is written even when the install step failed.
"""

import argparse
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PRESETS = ("h100", "fine")  # the target shape first
TARGET_PRESET = "h100"
DROPLESS_OURS = ("ours", "ours-autoep")  # the same work as hf-grouped_mm: no dropped tokens
REFERENCE = "hf-grouped_mm"
NATIVE_MIN_RATIO = 1.0
BEST_MIN_RATIO = 1.5
BLOCK_MIN_PCT_PEAK = 40.0
PLANNER_MAX_ERROR = 0.15
TRAIN_BACKENDS = ("native", "autoep")
# Raw files copied next to summary.md and results.json (8 files at most come back from the device).
RAW_FILES = ("bench-h100.json", "bench-fine.json", "profile-h100.txt", "profile-fine.txt", "logs.txt")
LOG_TAIL_LINES = 400


# --- collect ---------------------------------------------------------------------------------------------------------


def read_steps(work: Path) -> list[dict]:
    """steps.tsv, one line per step from gpu_check.sh: name, exit status (-1: not run), seconds, timeout, command;
    a failed step also gets the end of its log."""
    steps = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, timeout, command = line.split("\t", 4)
        step = {"name": name, "rc": int(rc), "seconds": float(seconds), "timeout_s": int(timeout),
                "command": command, "status": step_status(int(rc), int(timeout))}
        log = work / "logs" / f"{name}.log"
        if step["rc"] != 0 and log.exists():
            step["log_tail"] = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-8:]
        steps.append(step)
    return steps


def step_status(rc: int, timeout_s: int) -> str:
    if rc == 0:
        return "ok"
    if rc == -1:
        return "not run (out of time budget)"
    if rc in (124, 137):  # timeout(1): TERM, then KILL after the grace period
        return f"timed out after {timeout_s} s"
    return f"failed (exit {rc})"


def read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_junit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip()
                break
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message[:500]})
    return tests


def read_planner_rows(pytest_tmp: Path) -> list[dict]:
    """Planned and measured peaks that the GPU peak-memory test's worker wrote (kept by pytest --basetemp)."""
    rows = []
    for path in sorted(pytest_tmp.glob("test_peak_memory_within_15*/peak.rank0.json")):
        for row in read_json(path) or []:
            planned, measured = row["planned"]["peak"], row["measured"]["peak"]
            rows.append({"case": row["case"], "planned_gib": planned / 2**30, "measured_gib": measured / 2**30,
                         "error": (planned - measured) / measured})
    return rows


def read_training(path: Path) -> dict | None:
    """The run's own metrics.jsonl: every logged window, and the last one (past the first steps' warm-up)."""
    if not path.exists():
        return None
    from moe_recipe.metrics import read_metrics

    windows = [row for row in read_metrics(path) if "perf/tokens_per_s" in row]
    if not windows:
        return None
    last = windows[-1]
    return {
        "windows": [{"step": w["step"], "tokens_per_s": w["perf/tokens_per_s"],
                     "mfu_pct": 100 * w["perf/mfu"] if "perf/mfu" in w else None, "loss": w["train/loss"]}
                    for w in windows],
        "last_step": last["step"], "tokens_per_s": last["perf/tokens_per_s"],
        "mfu_pct": 100 * last["perf/mfu"] if "perf/mfu" in last else None, "loss": last["train/loss"],
    }


def collect(work: Path) -> dict:
    return {
        "mode": (work / "mode").read_text().strip() if (work / "mode").exists() else "gpu",
        "env": read_json(work / "env.json"),
        "steps": read_steps(work),
        "bench": {preset: read_json(work / f"bench-{preset}.json") for preset in PRESETS},
        "gpu_tests": read_junit(work / "gpu-tests.xml"),
        "planner_peak": read_planner_rows(work / "pytest-tmp"),
        "training": {backend: read_training(work / f"train-{backend}.jsonl") for backend in TRAIN_BACKENDS},
    }


# --- judge -----------------------------------------------------------------------------------------------------------


def step_of(results: dict, name: str) -> dict | None:
    return next((s for s in results["steps"] if s["name"] == name), None)


def why_unmeasured(results: dict, step_name: str, what: str) -> str:
    step = step_of(results, step_name)
    if step is None:
        return f"not measured: step {step_name} did not run"
    if step["status"] != "ok":
        return f"not measured: step {step_name} {step['status']}"
    return f"not measured: {what}"


def by_variant(rows: list[dict]) -> dict[str, dict]:
    return {row["variant"]: row for row in rows}


def verdict(value: float | None, passes: bool, unmeasured: str) -> dict:
    if value is None:
        return {"value": None, "verdict": unmeasured}
    return {"value": value, "verdict": "pass" if passes else "MISS"}


def bench_verdicts(results: dict, preset: str) -> list[dict]:
    bench = results["bench"].get(preset)
    step = f"bench-{preset}"
    train = by_variant(bench["train_step"]) if bench else {}
    block = by_variant(bench["moe_block"]) if bench else {}
    reference = train.get(REFERENCE)
    ratios = {name: train[name]["tokens_per_s"] / reference["tokens_per_s"]
              for name in DROPLESS_OURS if name in train and reference}
    native = ratios.get("ours")
    best_name = max(ratios, key=ratios.get) if ratios else None
    block_pcts = {name: block[name]["pct_peak"] for name in DROPLESS_OURS
                  if name in block and block[name].get("pct_peak") is not None}
    best_block = max(block_pcts, key=block_pcts.get) if block_pcts else None
    no_reference = "hf-grouped_mm did not run" if bench else "no results"
    rows = [
        {"preset": preset, "target": f"native backend >= {NATIVE_MIN_RATIO:.1f}x hf-grouped_mm tokens/s",
         "detail": "ours / hf-grouped_mm, training step",
         **verdict(native, native is not None and native >= NATIVE_MIN_RATIO,
                   why_unmeasured(results, step, no_reference)), "unit": "x"},
        {"preset": preset, "target": f"best backend >= {BEST_MIN_RATIO:.1f}x hf-grouped_mm tokens/s",
         "detail": f"best of {', '.join(DROPLESS_OURS)}" + (f": {best_name}" if best_name else ""),
         **verdict(ratios.get(best_name), best_name is not None and ratios[best_name] >= BEST_MIN_RATIO,
                   why_unmeasured(results, step, no_reference)), "unit": "x"},
        {"preset": preset, "target": f"MoE block fwd+bwd >= {BLOCK_MIN_PCT_PEAK:.0f}% of bf16 peak",
         "detail": f"best of {', '.join(DROPLESS_OURS)}" + (f": {best_block}" if best_block else ""),
         **verdict(block_pcts.get(best_block), best_block is not None and block_pcts[best_block] >= BLOCK_MIN_PCT_PEAK,
                   why_unmeasured(results, step, "no % of peak (CPU, or the block table did not run)")), "unit": "%"},
    ]
    return rows


def planner_verdict(results: dict) -> dict:
    rows = results["planner_peak"]
    worst = max((abs(r["error"]) for r in rows), default=None)
    return {"preset": "-", "target": f"planner peak memory within {PLANNER_MAX_ERROR:.0%} of measured",
            "detail": f"worst of {len(rows)} cases, torch.cuda.max_memory_allocated",
            **verdict(None if worst is None else 100 * worst, worst is not None and worst <= PLANNER_MAX_ERROR,
                      why_unmeasured(results, "gpu-tests",
                                     "the peak-memory test wrote no rows (skipped without CUDA)")),
            "unit": "% off"}


def target_verdicts(results: dict) -> list[dict]:
    return [row for preset in PRESETS for row in bench_verdicts(results, preset)] + [planner_verdict(results)]


def worst_case(results: dict, preset: str) -> dict | None:
    """The slowest dropless variant of ours, whose profile says where its time goes."""
    bench = results["bench"].get(preset)
    candidates = [r for r in (bench or {}).get("train_step", []) if r["variant"] in DROPLESS_OURS]
    return min(candidates, key=lambda r: r["tokens_per_s"]) if candidates else None


# --- render ----------------------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def render(results: dict) -> str:
    env = results.get("env") or {}
    lines = ["# GPU check", ""]
    if results["mode"] != "gpu":
        lines += [f"**{results['mode']}**: the script's logic on reduced shapes, not a measurement of the targets.", ""]
    if env:
        lines += [" | ".join(f"{k}: {v}" for k, v in env.items()), ""]

    lines += ["## Steps", ""]
    lines += table(["step", "status", "seconds", "timeout s", "command"],
                   [[s["name"], s["status"], f"{s['seconds']:.0f}", str(s["timeout_s"]), f"`{s['command']}`"]
                    for s in results["steps"]])

    verdicts = target_verdicts(results)
    lines += ["", f"## Targets (set for preset `{TARGET_PRESET}`; `fine` is held to the same bars for reference)", ""]
    lines += table(["preset", "target", "measured", "verdict", "what"],
                   [[v["preset"], v["target"], "-" if v["value"] is None else f"{v['value']:.2f} {v['unit']}",
                     v["verdict"], v["detail"]] for v in verdicts])

    for preset in PRESETS:
        bench = results["bench"].get(preset)
        if not bench:
            continue
        lines += ["", f"## Preset `{preset}`: " + ", ".join(f"{k}={v}" for k, v in bench["shape"].items()), ""]
        train = bench["train_step"]
        reference = by_variant(train).get(REFERENCE)
        lines += table(["variant", "tokens/s", "vs hf-grouped_mm", "step ms", "MFU %", "peak GiB", "max/mean load",
                        "dropped"],
                       [[r["variant"], f"{r['tokens_per_s']:,.0f}",
                         f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-",
                         f"{r['step_ms']:.1f}", fmt(r.get("mfu_pct"), ".1f"), fmt(r.get("peak_mem_gib"), ".2f"),
                         fmt(r.get("imbalance_mean"), ".2f"),
                         fmt(100 * r["dropped_fraction"], ".1f") + "%" if "dropped_fraction" in r else "-"]
                        for r in train])
        if bench.get("moe_block"):
            lines += ["", "MoE block forward + backward:", ""]
            lines += table(["variant", "fwd+bwd ms", "TFLOP/s", "% of peak"],
                           [[r["variant"], f"{r['fwd_bwd_ms']:.2f}", f"{r['tflops']:.3g}",
                             fmt(r.get("pct_peak"), ".1f")] for r in bench["moe_block"]])

    missed = {v["preset"] for v in verdicts if v["verdict"] == "MISS" and v["preset"] in PRESETS}
    for preset in PRESETS:
        if preset not in missed:
            continue
        worst = worst_case(results, preset)
        lines += ["", f"## Where the time goes: preset `{preset}`, `{worst['variant']}` (slowest dropless variant)", ""]
        if worst.get("top_kernels"):
            lines += table(["kernel / op", "calls", "self ms per step", "self %"],
                           [[f"`{k['name'][:90]}`", str(k["calls"]), f"{k['self_ms_per_step']:.2f}",
                             f"{k['self_pct']:.1f}"] for k in worst["top_kernels"][:12]])
            lines += ["", f"Full tables (also `{REFERENCE}` for comparison): `profile-{preset}.txt`."]
        else:
            lines += [f"No profile was recorded for it (see `profile-{preset}.txt` and the step's log)."]

    if results["planner_peak"]:
        lines += ["", "## Planner peak memory against torch.cuda.max_memory_allocated", ""]
        lines += table(["case", "planned GiB", "measured GiB", "error"],
                       [[r["case"], f"{r['planned_gib']:.2f}", f"{r['measured_gib']:.2f}", f"{100 * r['error']:+.1f}%"]
                        for r in results["planner_peak"]])

    if results["gpu_tests"]:
        lines += ["", "## GPU tests", ""]
        lines += table(["test", "outcome", "seconds", "message"],
                       [[t["test"], t["outcome"], f"{t['seconds']:.1f}", t["message"].splitlines()[0][:150]
                         if t["message"] else ""] for t in results["gpu_tests"]])

    lines += ["", "## Training: the deepspeed launcher, one device (overrides in the step's command)", "",
              "tokens/s and MFU of the last logged window, from the run's own metrics.jsonl."]
    lines += ["The metrics are logged before the final checkpoint is saved: a step that timed out during the save "
              "still has them.", ""]
    rows = []
    for backend, run in results["training"].items():
        if run is None:
            rows.append([backend, why_unmeasured(results, f"train-{backend}", "no metrics.jsonl"), "-", "-", "-"])
        else:
            step = step_of(results, f"train-{backend}")
            rows.append([backend, f"logged at steps {', '.join(str(w['step']) for w in run['windows'])}; step "
                         + (step["status"] if step else "did not run"),
                         f"{run['tokens_per_s']:,.0f}", fmt(run["mfu_pct"], ".1f"), f"{run['loss']:.3f}"])
    lines += table(["backend", "run", "tokens/s (last window)", "MFU %", "loss"], rows)

    failed = [s for s in results["steps"] if s["status"] != "ok"]
    if failed:
        lines += ["", "## Failed steps", "", "The end of each log (all of it in `logs.txt`):"]
        for step in failed:
            lines += ["", f"- `{step['name']}`: {step['status']}"]
            if step.get("log_tail"):
                lines += ["", "```", *(line[:200] for line in step["log_tail"]), "```"]
    return "\n".join(lines) + "\n"


# --- files -----------------------------------------------------------------------------------------------------------


def write_logs(work: Path, out: Path) -> None:
    """Every step's log, each cut to its last lines, in one file (the device returns at most 8 files)."""
    with open(out / "logs.txt", "w") as logs:
        for path in sorted((work / "logs").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()
            logs.write(f"===== {path.stem} ({len(text)} lines, last {LOG_TAIL_LINES})\n")
            logs.write("\n".join(text[-LOG_TAIL_LINES:]) + "\n")


def summarize(work: Path, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    results = collect(work)
    results["targets"] = target_verdicts(results)
    (work / "logs").mkdir(exist_ok=True)
    write_logs(work, out)
    for name in RAW_FILES:
        if (work / name).exists() and name != "logs.txt":
            shutil.copy(work / name, out / name)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = render(results)
    (out / "summary.md").write_text(summary)
    return summary


def environment() -> dict:
    import importlib.metadata as metadata
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "cuda": torch.version.cuda}
    for package in ("deepspeed", "transformers", "datasets", "hydra-core", "tokenizers", "huggingface-hub", "pyarrow"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "missing"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the environment as JSON")
    summarize_parser = sub.add_parser("summarize", help="write results.json, summary.md and the raw files to --out")
    summarize_parser.add_argument("--work", type=Path, required=True)
    summarize_parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "env":
        json.dump(environment(), sys.stdout)
    else:
        sys.stdout.write(summarize(args.work, args.out))


if __name__ == "__main__":
    main()
