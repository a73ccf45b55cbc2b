"""Train an MoE language model with DeepSpeed expert parallelism.

    python recipes/train.py                                        # one process, the tiny default
    torchrun --nproc_per_node 2 recipes/train.py parallel.ep_size=2
    deepspeed --num_gpus 4 recipes/train.py parallel.ep_size=2 zero=stage2 logging=offline
    moe-train trainer.max_steps=50                                 # the installed console command

Any Hydra override works the same way under every launcher.
"""

import dataclasses
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from moe_recipe.checkpoint import check_resume, planned_layout
from moe_recipe.config import CONF_DIR, RecipeConfig, global_batch_size
from moe_recipe.data import TrainingData, open_training_data
from moe_recipe.engine import check_precision_supported
from moe_recipe.errors import check_output_folder, refuse_bad_input
from moe_recipe.recipe import Recipe, load_recipe

log = logging.getLogger("moe_recipe")
PREFIX = "Invalid configuration"


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra would reject as an override."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            kept.append(arg)
    return kept


def default_single_process_env() -> None:
    """`python recipes/train.py` without a launcher: a world of one (else DeepSpeed falls back to MPI discovery)."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def setup_logging(run_dir: Path, is_main: bool) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def preflight(hydra_cfg: DictConfig) -> tuple[Recipe, TrainingData]:
    """Every check that needs no process group, on every rank alike: the config (types, keys, cross-section
    rules), the tokenizer, the precision this device runs, the run directory and the checkpoint to resume from;
    then the token stores are opened (the default store of a small source is built here on first use)."""
    recipe = load_recipe(hydra_cfg)
    t = recipe.config.trainer
    check_precision_supported(t.precision)
    check_output_folder(Path(t.run_dir), "trainer.run_dir")
    resume_from = check_resume(t.resume, Path(t.run_dir) / "checkpoints", recipe.model,
                               layout=planned_layout(recipe.config, recipe.world_size))
    recipe = dataclasses.replace(recipe, resume_from=resume_from)
    data = open_training_data(recipe.config.data, recipe.tokenizer,
                              global_batch_size=global_batch_size(t, recipe.world_size))
    return recipe, data


def train(cfg: RecipeConfig, recipe: Recipe, data: TrainingData) -> None:
    # cfg comes in as an argument: an attribute named `config` read here, beside `import torch.distributed`, makes
    # cloudpickle (hydra-submitit-launcher pickles this __main__ function by value) take torch.distributed.config,
    # which it cannot pickle.
    import deepspeed
    import torch.distributed as dist

    from moe_recipe.callbacks import build_callbacks
    from moe_recipe.engine import build_model, check_op_build_lock, initialize_engine, recipe_grad_clip
    from moe_recipe.metrics import MetricsSink
    from moe_recipe.trainer import Trainer

    default_single_process_env()
    check_op_build_lock()  # before init_distributed, which loads (and on first use builds) DeepSpeed's comm op
    deepspeed.init_distributed()
    rank = dist.get_rank()
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, rank == 0)

    # Same seed on every rank: identical dense weights, and each global expert identical for any ep_size.
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(recipe.model, cfg.parallel.ep_size)
    if cfg.trainer.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = initialize_engine(model, cfg, recipe.deepspeed, recipe.total_steps)
    torch.manual_seed(cfg.trainer.seed + rank)  # independent router noise per rank from here on

    if rank == 0:  # only now: a run refused earlier leaves an existing run directory's files as they were
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(recipe.resolved))
        (run_dir / "ds_config.json").write_text(json.dumps(recipe.deepspeed, indent=2))
    resume_step = recipe.resume_from.step if recipe.resume_from is not None else 0
    metrics = MetricsSink(run_dir, cfg.logging, cfg.name, recipe.resolved, enabled=rank == 0, resume_step=resume_step)
    trainer = Trainer(engine, cfg.trainer, data, total_steps=recipe.total_steps, grad_clip=recipe_grad_clip(cfg),
                      callbacks=build_callbacks(recipe, data, metrics, run_dir), resume_from=recipe.resume_from)
    try:
        trainer.fit()
    finally:
        metrics.close()
    if rank == 0:
        recipe.tokenizer.save_pretrained(run_dir / "tokenizer")
    dist.barrier()
    dist.destroy_process_group()
    if trainer.stop_requested == "preempt":  # Slurm's scripts requeue the job on this code; Ctrl-C exits 0
        sys.exit(int(os.environ.get("MOE_PREEMPT_EXIT_CODE", "0")))


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log_config_warnings_once() -> None:
    """A setting without effect makes MoeConfig warn (warnings.warn) each time a config is built, on every rank.
    Through the log instead: rank 0 prints each message once, before training starts; the other ranks, like every
    other log line, stay silent ("once" keeps a message from coming back when a later config repeats it)."""
    logging.captureWarnings(True)
    warnings.filterwarnings("once", message="MoeConfig: ", category=UserWarning)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(hydra_cfg: DictConfig) -> None:
    # Warnings of the checks (a checkpoint passed over) from one rank; setup_logging takes over in train().
    logging.basicConfig(level=logging.WARNING if is_rank_zero() else logging.ERROR, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    log_config_warnings_once()
    # Every check runs before any process group exists: bad input stops all ranks with one message.
    with refuse_bad_input(PREFIX, speak=is_rank_zero()):
        recipe, data = preflight(hydra_cfg)
    train(recipe.config, recipe, data)


def stop_quietly_on_ctrl_c() -> None:
    """Ctrl-C (or the launcher's SIGTERM that follows it) before training starts, where the trainer's StopCheck
    takes over: exit with one line from rank 0, not a traceback from every rank. SystemExit unwinds, so a lock held
    meanwhile (torch's on DeepSpeed's comm op, taken at every load) is released, not left behind."""
    def stop(signum, frame):
        if is_rank_zero():
            os.write(2, f"{signal.Signals(signum).name}: stopped before training started\n".encode())
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main() -> None:
    stop_quietly_on_ctrl_c()
    sys.argv = strip_launcher_args(sys.argv)
    # Hydra prints a config it cannot compose (an unknown config group option, a wrong type, an unknown key) its own
    # way and exits 1, on every rank; with HYDRA_FULL_ERROR=1 it raises instead, and the error gets the recipe's one
    # line from rank 0 and exit status 2. Set whatever the caller's value (HYDRA_FULL_ERROR=0 only shortens the
    # traceback of a bug, which refuse_bad_input passes on in full anyway).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    with refuse_bad_input(PREFIX, speak=is_rank_zero(), config_only=True):
        hydra_main()


if __name__ == "__main__":
    main()
