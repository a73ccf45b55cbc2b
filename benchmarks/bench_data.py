"""Data at scale: preparation throughput, memory per training rank against corpus size, data time per step.

1. Preparation: real text (the embedded pydoc corpus, repeated to --prep-mb of JSON lines) through
   `moe-prepare-data --num-proc <cores>` against a single-process, single-threaded loop of `tokenizer(batch)` over
   the same documents, in the same run. tokens/s of the tokenizing part (the command's own timing, without its
   Python start-up).
2. Training: two synthetic stores of random token ids (uint16 files written directly, --big-tokens and
   --small-tokens; a manifest by `moe-prepare-data --from-tokens`), then 2 ranks (torchrun, gloo, EP 2) of the tiny
   model train --steps steps on each; every rank reports its RSS (and the file-backed part, the page cache of the
   memory map) after the steps, and the time spent fetching batches as a fraction of step time.

    python -m benchmarks.bench_data                 # ~10 min on 2 busy cores; files under .cache/bench_data, deleted
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def preparation(work: Path, prep_mb: int, num_proc: int) -> dict:
    from pydoc_data.topics import topics

    corpus = work / "text.jsonl"
    texts = [topics[k] for k in sorted(topics)]
    with corpus.open("w") as f:
        while f.tell() < prep_mb << 20:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    store = work / "text-store"
    run([sys.executable, "-m", "moe_recipe.prepare_data", "--num-proc", str(num_proc), "data=local_files",
         f"data.data_files=[{corpus}]", f"data.store={store}", f"data.cache_dir={work / 'cache'}"])
    manifest = json.loads((store / "manifest.json").read_text())
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    # The single-process loop, in a fresh process whose tokenizer may not use its thread pool.
    loop = run([sys.executable, "-c", f"""
import json, time
from moe_recipe.data import DataConfig, load_tokenizer
tok = load_tokenizer(DataConfig())
docs = [json.loads(line)["text"] for line in open({str(corpus)!r})]
start = time.perf_counter(); n = 0
for i in range(0, len(docs), 1000):
    n += sum(len(ids) + 1 for ids in tok(docs[i:i + 1000], add_special_tokens=False)["input_ids"])
print(n, time.perf_counter() - start)
"""], env={"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"})
    loop_tokens, loop_seconds = loop.stdout.split()[-2:]
    return {"text_mb": round(corpus.stat().st_size / 2**20, 1), "tokens": tokens, "num_proc": num_proc,
            "prepare_seconds": manifest["seconds"], "prepare_tokens_per_s": tokens / manifest["seconds"],
            "loop_tokens": int(loop_tokens), "loop_tokens_per_s": int(loop_tokens) / float(loop_seconds)}


def synthetic_store(folder: Path, num_tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "train.bin").open("wb") as f:
        for start in range(0, num_tokens, 1 << 24):
            rng.integers(2, 4096, min(1 << 24, num_tokens - start), dtype=np.uint16).tofile(f)
    rng.integers(2, 4096, 1 << 16, dtype=np.uint16).tofile(folder / "val.bin")
    run([sys.executable, "-m", "moe_recipe.prepare_data", "--from-tokens", str(folder / "train.bin"),
         "--val-tokens", str(folder / "val.bin"), "--output", str(folder)])
    return folder


def train(store: Path, steps: int) -> list[dict]:
    out = store / "ranks.json"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={29500 + os.getpid() % 1000}", str(Path(__file__)), "--worker", str(store), "--steps",
         str(steps), "--out", str(out)], timeout=3600)
    return [json.loads(line) for line in out.read_text().splitlines()]


def worker(store: Path, steps: int, out: Path) -> None:
    """One rank: the recipe's engine and training step (train_step, over the Trainer's micro batches) on the tiny
    model, reading `store`."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from moe_recipe.data import open_training_data
    from moe_recipe.engine import build_model, initialize_engine, recipe_grad_clip
    from moe_recipe.recipe import load_recipe
    from moe_recipe.train_step import train_step
    from moe_recipe.trainer import Trainer

    recipe = load_recipe([f"data.store={store}", "parallel.ep_size=2", "trainer.micro_batch_size=4",
                          f"trainer.run_dir={store / 'run'}", "trainer.precision=fp32"])
    cfg = recipe.config
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    data = open_training_data(cfg.data, recipe.tokenizer, global_batch_size=4 * world)
    fetch = {"seconds": 0.0}
    read = data.train_micro_batch

    def timed_read(**kwargs):
        start = time.perf_counter()
        batch = read(**kwargs)
        fetch["seconds"] += time.perf_counter() - start
        return batch

    data.train_micro_batch = timed_read
    torch.manual_seed(0)
    engine = initialize_engine(build_model(recipe.model, cfg.parallel.ep_size), cfg, recipe.deepspeed,
                               recipe.total_steps)
    trainer = Trainer(engine, cfg.trainer, data, total_steps=steps, callbacks=[])
    grad_clip = recipe_grad_clip(cfg)
    train_step(engine, trainer.micro_batches(0), grad_clip)  # warm-up
    fetch["seconds"] = 0.0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        train_step(engine, trainer.micro_batches(step), grad_clip)
    seconds = time.perf_counter() - start
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
    row = {"rank": rank, "rss_mb": kb["VmRSS"] / 1024, "rss_anon_mb": kb["RssAnon"] / 1024,
           "rss_file_mb": kb["RssFile"] / 1024, "step_ms": 1000 * seconds / steps,
           "fetch_ms": 1000 * fetch["seconds"] / steps, "fetch_fraction": fetch["seconds"] / seconds}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench_data")
    parser.add_argument("--prep-mb", type=int, default=20, help="MB of JSON-lines text for the preparation figures")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--big-tokens", type=int, default=300_000_000)
    parser.add_argument("--small-tokens", type=int, default=30_000_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.out)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        prep = preparation(args.work, args.prep_mb, args.num_proc)
        print(f"preparation of {prep['text_mb']} MB of text ({prep['tokens']:,} tokens): moe-prepare-data "
              f"--num-proc {prep['num_proc']}: {prep['prepare_tokens_per_s']:,.0f} tokens/s; single-process "
              f"tokenizer loop: {prep['loop_tokens_per_s']:,.0f} tokens/s "
              f"(x{prep['prepare_tokens_per_s'] / prep['loop_tokens_per_s']:.2f})")
        results = {}
        for name, num_tokens in (("small", args.small_tokens), ("big", args.big_tokens)):
            store = synthetic_store(args.work / f"{name}-store", num_tokens)
            results[name] = train(store, args.steps)
            for row in results[name]:
                print(f"{num_tokens / 1e6:,.0f}M-token store ({num_tokens * 2 / 2**20:,.0f} MiB on disk), rank "
                      f"{row['rank']} after {args.steps} steps: RSS {row['rss_mb']:.0f} MiB (anon "
                      f"{row['rss_anon_mb']:.0f}, file {row['rss_file_mb']:.0f}); step {row['step_ms']:.1f} ms, "
                      f"batch fetch {row['fetch_ms']:.3f} ms = {100 * row['fetch_fraction']:.2f}% of the step")
            shutil.rmtree(store)
        for small, big in zip(results["small"], results["big"]):
            print(f"rank {small['rank']}: RSS big / small = {big['rss_mb'] / small['rss_mb']:.3f}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
