"""Load balancing compared: the same model, tokens and seed trained with each balancing method: each
`model.router.balance` loss, the expert bias alone (`bias`) and the bias beside the sequence loss (`bias+sequence`).

Each method is one run of the real training entry point (recipes/train.py, one CPU process) on the embedded corpus:
a tiny MoE with 16 experts (top-2) in each of 4 layers and DeepSpeed's capacity (factor 1.25, so imbalance shows as
dropped routes while training). The runs' metrics.jsonl files give, per method:
  - the final eval loss (dropless, the same validation rows for every run);
  - max/mean expert load per layer in the last log window: the busiest expert's routes over the fair share (1.0 is
    perfect balance), as the router asked for them (demand) and as the experts received them (after the capacity);
  - dead experts: experts that received no route in the last log window, summed over the layers;
  - the share of routes dropped at the capacity limit in the last window;
and a plot of the mean demand max/mean over the layers against the training step.

    python -m benchmarks.balancing                         # about 5 minutes on 2 CPU cores
    python -m benchmarks.balancing --steps 100 --methods aux bias --out /tmp/balancing

Writes OUT/results.json, OUT/results.md (the table in docs/balancing.md) and OUT/imbalance.png; the run folders go
under OUT/runs (deleted unless --keep-runs).
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from moe_recipe.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # method -> its overrides; the loss coefficient is the one each method is used with
    "none": ["model.router.balance=none", "model.router_aux_loss_coef=0"],
    "aux": ["model.router.balance=aux", "model.router_aux_loss_coef=0.01"],
    "global": ["model.router.balance=global", "model.router_aux_loss_coef=0.01"],
    "sequence": ["model.router.balance=sequence", "model.router_aux_loss_coef=0.01"],
    "bias": ["model.router.balance=none", "model.router.expert_bias=true", "model.router_aux_loss_coef=0"],
    "bias+sequence": ["model.router.balance=sequence", "model.router.expert_bias=true",
                      "model.router_aux_loss_coef=0.0001"],
}
MODEL = ["model.num_experts=16", "model.num_experts_per_tok=2", "model.num_hidden_layers=4",
         "model.capacity_factor=1.25", "model.drop_tokens=true"]
LAYER_METRIC = re.compile(r"^routing/layer_(\d+)/(.+)$")


def train(method: str, run_dir: Path, steps: int, seed: int) -> float:
    command = [sys.executable, "recipes/train.py", *METHODS[method], *MODEL, f"trainer.max_steps={steps}",
               "trainer.log_interval=10", f"trainer.eval_interval={steps}", f"trainer.checkpoint_interval={steps}",
               "trainer.heatmap_interval=null", f"trainer.seed={seed}", f"trainer.run_dir={run_dir}",
               "trainer.resume=none", "logging=disabled"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise SystemExit(f"{method}: {' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def per_layer(record: dict, name: str) -> dict[int, float]:
    """{decoder layer: value} of routing/layer_<i>/<name> in one metrics record."""
    values = {}
    for key, value in record.items():
        match = LAYER_METRIC.match(key)
        if match and match.group(2) == name:
            values[int(match.group(1))] = value
    return dict(sorted(values.items()))


def summarize(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    train_records = [r for r in records if "train/loss" in r]
    last = train_records[-1]
    eval_loss = [r["eval/loss"] for r in records if "eval/loss" in r][-1]
    shares = {}  # layer -> expert shares of the received routes in the last window
    for key, value in last.items():
        match = LAYER_METRIC.match(key)
        if match and match.group(2).startswith("expert_") and match.group(2)[7:].isdigit():
            shares.setdefault(int(match.group(1)), []).append(value)
    demand = per_layer(last, "max_demand")
    return {
        "eval_loss": eval_loss,
        "final_train_lm_loss": last.get("train/lm_loss"),
        "max_over_mean_demand": demand,
        "max_over_mean_received": per_layer(last, "max_load"),
        "dead_experts": sum(sum(share == 0.0 for share in row) for row in shares.values()),
        "dropped_fraction": sum(per_layer(last, "dropped_fraction").values()) / max(len(demand), 1),
        "imbalance_curve": [(r["step"], sum(per_layer(r, "max_demand").values()) / len(per_layer(r, "max_demand")))
                            for r in train_records],
    }


def table(results: dict, steps: int) -> str:
    lines = [f"| method | eval loss (step {steps}) | max/mean demand per layer | max/mean received per layer | "
             "dead experts | dropped routes |", "|---|---|---|---|---|---|"]
    for method, r in results.items():
        demand = " / ".join(f"{v:.2f}" for v in r["max_over_mean_demand"].values())
        received = " / ".join(f"{v:.2f}" for v in r["max_over_mean_received"].values())
        lines.append(f"| {method} | {r['eval_loss']:.4f} | {demand} | {received} | {r['dead_experts']} | "
                     f"{r['dropped_fraction']:.1%} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, r in results.items():
        steps, imbalance = zip(*r["imbalance_curve"])
        ax.plot(steps, imbalance, label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("max / mean expert demand (mean over layers)")
    ax.set_title("Load imbalance while training, per balancing method")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "balancing")
    parser.add_argument("--keep-runs", action="store_true")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    for method in args.methods:
        run_dir = args.out / "runs" / method.replace("+", "_")
        seconds[method] = train(method, run_dir, args.steps, args.seed)
        results[method] = summarize(run_dir)
        print(f"{method:>14}: eval loss {results[method]['eval_loss']:.4f}, max/mean demand "
              f"{list(results[method]['max_over_mean_demand'].values())}, {seconds[method]:.0f} s", flush=True)
    if not args.keep_runs:
        shutil.rmtree(args.out / "runs")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    (args.out / "results.json").write_text(json.dumps({
        "steps": args.steps, "seed": args.seed, "model_overrides": MODEL, "methods": {m: METHODS[m] for m in results},
        "machine": machine, "seconds": seconds, "results": results}, indent=1))
    (args.out / "results.md").write_text(table(results, args.steps) + "\n")
    plot(results, args.out / "imbalance.png")
    print(table(results, args.steps))
    print(f"wrote {args.out}/results.json, results.md, imbalance.png")


if __name__ == "__main__":
    main()
