#!/usr/bin/env bash
# The GPU figures in one command, for one H100/H200 lent through the device tool (benchmarks/README.md, "GPU check"):
#   1. bench-h100   python -m benchmarks.bench_model --preset h100 --backend deepspeed autoep (+ profile)
#   2. bench-fine   python -m benchmarks.bench_model --preset fine --backend deepspeed autoep (+ profile)
#   3. gpu-tests    pytest -m gpu: backend agreement on CUDA, planner peak memory vs torch.cuda.max_memory_allocated
#   4. train-native, train-autoep: recipes/train.py model=small, 30 steps, bf16, the deepspeed launcher, one GPU
# then results.json, summary.md and the raw files (at most 8 files) in --out DIR (default: $OUT).
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine, .whl/ carried (scripts/build_gpu_wheels.sh)
#   bash benchmarks/gpu_check.sh --dry-run                # anywhere: the commands, and the checks a CPU can make
#   GPU_CHECK_CPU_REHEARSAL=1 bash benchmarks/gpu_check.sh --out /tmp/rehearsal   # every step, reduced, on CPU
#
# Each step has its own timeout, and all steps share GPU_CHECK_BUDGET_S (default 480 s); a failing step does not stop
# the others. Environment: GPU_CHECK_WORK (scratch folder, default /tmp/gpu_check), GPU_CHECK_TIMEOUT_SCALE (1; 3 in
# the rehearsal), PYTHON.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

DRY_RUN=0
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

REHEARSAL=${GPU_CHECK_CPU_REHEARSAL:-0}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
# A shared CPU runs the rehearsal's small shapes slower than the GPU runs the real ones: longer timeouts there.
TIMEOUT_SCALE=${GPU_CHECK_TIMEOUT_SCALE:-$([ "$REHEARSAL" = 1 ] && echo 3 || echo 1)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-$(( 480 * TIMEOUT_SCALE ))}
WHEELS=$REPO/.whl
SITE=/tmp/site
# What the device image lacks (scripts/build_gpu_wheels.sh makes these).
NEEDED_WHEELS=(deepspeed hjson pydantic pydantic_core annotated_types typing_inspection hydra_core omegaconf
               antlr4_python3_runtime datasets dill multiprocess transformers regex)

if [ "$REHEARSAL" = 1 ]; then
  MODE="CPU rehearsal"
  PY=${PYTHON:-$REPO/.venv/bin/python}
  H100_ARGS=(--preset cpu --layers 2 --seq 64 --batch 2 --warmup 1 --steps 2)
  FINE_ARGS=(--preset fine --variants ours hf-grouped_mm --capacity-factors 1.0 --layers 1 --hidden 128 --heads 4
             --kv-heads 2 --expert-size 64 --seq 64 --batch 2 --vocab 512 --warmup 1 --steps 2)
  TRAIN_ARGS=(model=tiny trainer.precision=fp32 trainer.max_steps=3 trainer.log_interval=1 optim.warmup_steps=1
              data.seq_len=128 trainer.micro_batch_size=4)
  # pip leaves the launcher of the venv: the deepspeed launcher's children need no PYTHONPATH there.
  export PYTHONPATH=$REPO
else
  MODE="gpu"
  PY=${PYTHON:-python3}
  H100_ARGS=(--preset h100)
  # Without hf-eager (a Python loop over 64 experts) and with one capacity factor, to stay near a minute.
  FINE_ARGS=(--preset fine --variants ours hf-grouped_mm --capacity-factors 1.0)
  # 8 x 2048 tokens per step; logged every 10 steps, so the last window (steps 21-30) is past the warm-up.
  TRAIN_ARGS=(model=small trainer.precision=bf16 trainer.max_steps=30 trainer.log_interval=10 data.seq_len=2048
              trainer.micro_batch_size=8)
  export PYTHONPATH=$SITE:$REPO
fi
TRAIN_COMMON=(trainer.eval_batches=1 trainer.checkpoint_interval=1000 trainer.heatmap_interval=null
              trainer.resume=none logging=disabled)
AUTOEP_ARGS=(model.moe_backend=autoep model.drop_tokens=false)
GPU_TEST_FILES=($(grep -rl --include='test_*.py' 'mark.gpu' tests | sort))

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
# DeepSpeed's op builder fails on the "9.0a" that torch reports for Hopper; a private extensions folder, because a
# step killed at its timeout while holding torch's build lock would hang every later build in a shared one.
export TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=$WORK/torch_extensions

free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# name timeout command...: the command's exit status, seconds and log go to $WORK; never stops the script.
DEADLINE=$(( $(date +%s) + BUDGET_S ))
run_step() {
  local name=$1 timeout=$(( $2 * TIMEOUT_SCALE )); shift 2
  if [ "$DRY_RUN" = 1 ]; then
    printf '%-13s timeout %4s s: %s\n' "$name" "$timeout" "$(printf '%q ' "$@")"
    return 0
  fi
  local left=$(( DEADLINE - $(date +%s) ))
  (( timeout > left )) && timeout=$left
  local start rc
  start=$(date +%s)
  if (( timeout < 20 )); then
    rc=-1
    echo "== $name: not run, $left s of the budget left" | tee "$WORK/logs/$name.log"
  else
    echo "== $name (timeout $timeout s): $*"
    timeout --kill-after=15 "$timeout" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$timeout" "$*" >>"$WORK/steps.tsv"
}

train_run() {  # backend, overrides...: one 30-step run; keeps its metrics.jsonl, drops its checkpoints
  local backend=$1; shift
  local run_dir=$WORK/runs/$backend
  run_step "train-$backend" 75 "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$(free_port)" \
    recipes/train.py "${TRAIN_ARGS[@]}" "${TRAIN_COMMON[@]}" "$@" "name=gpu-check-$backend" \
    "trainer.run_dir=$run_dir"
  if [ "$DRY_RUN" = 0 ]; then
    cp "$run_dir/metrics.jsonl" "$WORK/train-$backend.jsonl" 2>/dev/null
    rm -rf "$run_dir"  # the final checkpoint of model=small is ~20 GB
  fi
}

run_all_steps() {
  run_step bench-h100 110 "$PY" -m benchmarks.bench_model "${H100_ARGS[@]}" --backend deepspeed autoep \
    --json "$WORK/bench-h100.json" --profile "$WORK/profile-h100.txt"
  run_step bench-fine 90 "$PY" -m benchmarks.bench_model "${FINE_ARGS[@]}" --backend deepspeed autoep \
    --json "$WORK/bench-fine.json" --profile "$WORK/profile-fine.txt"
  run_step gpu-tests 150 "$PY" -m pytest -m gpu -rA -p no:cacheprovider --basetemp "$WORK/pytest-tmp" \
    --junitxml "$WORK/gpu-tests.xml" "${GPU_TEST_FILES[@]}"
  train_run native
  train_run autoep "${AUTOEP_ARGS[@]}"
}

# --- dry run: the commands, then what a CPU can check -------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  echo "mode: $MODE | python: $PY | work: $WORK | out: ${OUT_DIR:-(unset: pass --out or set OUT)} | budget: $BUDGET_S s"
  echo "PYTHONPATH=$PYTHONPATH TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
  [ "$REHEARSAL" = 1 ] || echo "install: $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir" \
    "--upgrade --target $SITE $WHEELS/*.whl"
  run_all_steps
  echo "summary: $PY -m benchmarks.gpu_summary summarize --work $WORK --out ${OUT_DIR:-\$OUT}"
  echo "checks:"
  failed=0
  if [ "$REHEARSAL" = 1 ]; then
    echo "  wheels: not needed (the rehearsal uses $PY)"
  else
    missing=()
    for name in "${NEEDED_WHEELS[@]}"; do
      compgen -G "$WHEELS/$name-*.whl" >/dev/null || missing+=("$name")
    done
    if [ ${#missing[@]} -eq 0 ]; then
      echo "  wheels: ok ($(du -sh "$WHEELS" | cut -f1) in $WHEELS)"
    else
      echo "  wheels: FAIL, missing ${missing[*]} in $WHEELS (run scripts/build_gpu_wheels.sh)"; failed=1
    fi
  fi
  # The repository's side, in one process (here, with this checkout's venv): presets, the Hydra overrides of both
  # training runs through moe-plan's validation, and the gpu-marked tests' collection.
  CHECK_PY=$REPO/.venv/bin/python
  [ -x "$CHECK_PY" ] || CHECK_PY=$PY
  PYTHONPATH=$REPO "$CHECK_PY" - "${H100_ARGS[1]}" "${FINE_ARGS[1]}" "${TRAIN_ARGS[*]} ${TRAIN_COMMON[*]}" \
    "${AUTOEP_ARGS[*]}" "${GPU_TEST_FILES[@]}" <<'EOF' || failed=1
import contextlib, io, sys

import pytest

from benchmarks.bench_model import PRESETS
from moe_recipe.plan import main as moe_plan

h100, fine, train, autoep, *test_files = sys.argv[1:]
failed = False
missing = [p for p in (h100, fine) if p not in PRESETS]
print(f"  presets: {'FAIL, missing ' + ', '.join(missing) if missing else 'ok'} ({h100}, {fine} in {', '.join(PRESETS)})")
failed |= bool(missing)
for name, overrides in [("native", train.split()), ("autoep", train.split() + autoep.split())]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        status = moe_plan([*overrides, "--nodes", "1", "--gpus-per-node", "1", "--gpu", "h100"])
    # 0 fits, 1 does not fit, 3 valid but not modeled (AutoEP): the config composes and validates.
    ok = status in (0, 1, 3)
    print(f"  train-{name} overrides: {'ok' if ok else 'FAIL'} (moe-plan exit {status})"
          + ("" if ok else "\n" + err.getvalue()[-2000:]))
    failed |= not ok


class Collected:
    def pytest_collection_finish(self, session):
        self.names = [item.nodeid for item in session.items]


collected = Collected()
with contextlib.redirect_stdout(io.StringIO()) as log:
    status = pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *test_files],
                         plugins=[collected])
names = getattr(collected, "names", [])
ok = status == 0 and bool(names)
print(f"  gpu tests: {'ok' if ok else 'FAIL'} ({len(names)} selected: {', '.join(n.split('::')[-1] for n in names)})"
      + ("" if ok else "\n" + log.getvalue()[-2000:]))
failed |= not ok
sys.exit(1 if failed else 0)
EOF
  [ $failed = 0 ] && echo "dry run: ok" || echo "dry run: FAIL"
  exit $failed
fi

# --- the run --------------------------------------------------------------------------------------------------------
if [ -z "$OUT_DIR" ]; then
  echo "no output folder: pass --out DIR or set OUT" >&2
  exit 64
fi
mkdir -p "$WORK" "$OUT_DIR"
find "$WORK" -mindepth 1 -maxdepth 1 ! -name torch_extensions -exec rm -rf {} +
mkdir -p "$WORK/logs"
echo "$MODE" >"$WORK/mode"
echo "mode: $MODE | work: $WORK | out: $OUT_DIR | budget: $BUDGET_S s for the steps"

if [ "$REHEARSAL" != 1 ]; then
  start=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl >"$WORK/logs/install.log" 2>&1
  rc=$?
  printf 'install\t%s\t%s\t0\tpip install --target %s .whl/*.whl\n' "$rc" "$(( $(date +%s) - start ))" "$SITE" \
    >>"$WORK/steps.tsv"
  DEADLINE=$(( $(date +%s) + BUDGET_S ))
fi
timeout 60 "$PY" -m benchmarks.gpu_summary env >"$WORK/env.json" 2>"$WORK/logs/env.log"
nvidia-smi >>"$WORK/logs/env.log" 2>&1

run_all_steps

"$PY" -m benchmarks.gpu_summary summarize --work "$WORK" --out "$OUT_DIR"
echo "results: $(ls "$OUT_DIR" | tr '\n' ' ')"
