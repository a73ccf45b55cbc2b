"""Checkpoints that survive a crash and a change of layout.

A checkpoint is a folder `step_XXXXXXXX/` holding
- DeepSpeed's native checkpoint (model states, one file per expert, ZeRO optimizer shards): exact resume at the
  layout it was saved with (same world size, ep_size, ZeRO stage, offload and precision);
- `portable/`: every parameter's fp32 master weight and Adam moments under its global name, and the persistent
  buffers (the expert bias) (see reshard.py): resume at any other layout, and the export command, read these;
- `rng_rankXXXXX.pt`: each rank's RNG state;
- `checkpoint.json`, the manifest: step, model config (no layout in it), layout, LR schedule, engine counters, every
  tensor's file and shape, every file's size.

Crash safety: the ranks write into `step_XXXXXXXX.incomplete/`; after a barrier rank 0 writes the manifest, fsyncs,
renames the folder to `step_XXXXXXXX` (atomic on POSIX) and only then points `latest` at it (temp file + os.replace).
A process killed at any moment therefore leaves either a complete `step_XXXXXXXX` or an `.incomplete` folder that
resume ignores and the next save removes. Resume scans for the newest complete folder rather than trusting `latest`
(kept for DeepSpeed's tools such as zero_to_fp32.py), and checks every file against the manifest before loading:
`check_resume` does that once per rank, before any process group exists, and hands the manifest it read on in a
`ResumePoint` for `load_checkpoint`.

Retention (`prune_checkpoints`, after each save): the newest `trainer.keep_last`, every `trainer.keep_every`-th and
the one `latest` names stay; a removed checkpoint is renamed to `step_XXXXXXXX.deleting` before its files go.
"""

import inspect
import json
import logging
import os
import pickletools
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from moe_model import MoeConfig
from moe_model.configuration_moe import upgrade_config_dict

from .config import RecipeConfig, model_setting_name
from .engine import resolve_precision
from .files import fsync_path, fsync_tree, write_atomic
from .reshard import check_tensors_match, load_portable_state, save_portable_state, unsupported_reason

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
FORMAT = "moe-recipe-checkpoint-v1"
INCOMPLETE = ".incomplete"
DELETING = ".deleting"  # a checkpoint being removed (prune_checkpoints)
_TAG = re.compile(r"^step_(\d{8})$")

# Bookkeeping, legitimately different between jobs.
_UNCOMPARED_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path",
                    "pad_token_id", "bos_token_id", "eos_token_id", "auto_map"}


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to resume from and its manifest, whose files were checked when it was read."""

    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def current_layout(engine) -> dict:
    """What a native DeepSpeed checkpoint is tied to."""
    return {
        "world_size": dist.get_world_size(),
        "ep_size": engine.module.ep_size,
        "zero_stage": engine.zero_optimization_stage(),
        "offload_optimizer": bool(engine.zero_cpu_offload()),
        "dtype": str(engine.get_data_types()[0]).removeprefix("torch."),
    }


def planned_layout(cfg: RecipeConfig, world_size: int) -> dict:
    """`current_layout` of the engine a run with `cfg` on `world_size` ranks will build, known before it exists."""
    dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return {
        "world_size": world_size,
        "ep_size": cfg.parallel.ep_size,
        "zero_stage": cfg.zero.stage,
        "offload_optimizer": cfg.zero.offload_optimizer,
        "dtype": dtypes[resolve_precision(cfg.trainer.precision)],
    }


# A layout entry and the setting that chooses it, for messages (the world size is the launcher's).
_LAYOUT_SETTINGS = {"world_size": None, "ep_size": "parallel.ep_size", "zero_stage": "zero.stage",
                    "offload_optimizer": "zero.offload_optimizer", "dtype": "dtype (trainer.precision)"}


def _layout_words(layout: dict, keys: list[str]) -> str:
    """The entries `keys` of a layout in the recipe's words: "2 ranks, parallel.ep_size=2"."""
    return ", ".join(f"{layout[key]} rank{'s' if layout[key] != 1 else ''}" if key == "world_size"
                     else f"{_LAYOUT_SETTINGS[key]}={layout[key]}" for key in keys)


def check_layout_matches(manifest: dict, layout: dict, folder: Path) -> None:
    """A checkpoint without layout-independent state (`unsupported_reason`: the autoep backend, ZeRO-3) resumes only
    at the layout it was saved with; raise a ValueError naming what differs."""
    saved = manifest["layout"]
    if manifest["tensors"] is not None or saved == layout:
        return
    keys = [key for key in _LAYOUT_SETTINGS if saved.get(key) != layout.get(key)]
    raise ValueError(f"checkpoint {folder} was saved at {_layout_words(saved, keys)} and holds no layout-independent "
                     f"state (model.moe_backend={manifest['model'].get('moe_backend', 'deepspeed')!r}, "
                     f"zero.stage={saved['zero_stage']}); this run has {_layout_words(layout, keys)}. Resume it at the "
                     "layout it was saved with, or use a new trainer.run_dir.")


def save_checkpoint(engine, checkpoint_dir: Path, step: int) -> Path:
    """Collective: every rank writes its native shards, its share of the portable state and its RNG state."""
    tag = checkpoint_tag(step)
    final, partial = checkpoint_dir / tag, checkpoint_dir / f"{tag}{INCOMPLETE}"
    rank = dist.get_rank()
    if final.exists():  # resolve_resume refuses runs that could get here; never replace a good checkpoint
        raise RuntimeError(f"{final} already exists; refusing to overwrite it.")
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir.glob(f"step_*{INCOMPLETE}"):  # left by a save that was killed
            shutil.rmtree(stale)
        partial.mkdir()
    dist.barrier()

    engine.save_checkpoint(str(checkpoint_dir), tag=partial.name, client_state={"step": step}, save_latest=False)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, partial / f"rng_rank{rank:05d}.pt")
    unsupported = unsupported_reason(engine)
    if unsupported is None:
        tensors, optimizer = save_portable_state(engine, partial)
    else:
        log.warning("checkpoint %s holds no layout-independent state (%s): it resumes at this layout only", tag,
                    unsupported)
        tensors, optimizer = None, None
    dist.barrier()  # every rank's files are written

    if rank == 0:
        fsync_tree(partial)
        files = {str(path.relative_to(partial)): path.stat().st_size
                 for path in sorted(partial.rglob("*")) if path.is_file()}
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        manifest = {
            "format": FORMAT,
            "step": step,
            "model": json.loads(engine.module.config.to_json_string(use_diff=False)),
            "layout": current_layout(engine),
            "train_batch_size": engine.train_batch_size(),
            "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                       "skipped_steps": engine.skipped_steps},
            "scheduler": scheduler,
            "optimizer": optimizer,
            "tensors": tensors,
            "files": files,
        }
        write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
        os.rename(partial, final)  # the commit point: from here on the checkpoint exists
        fsync_path(checkpoint_dir)
        write_atomic(checkpoint_dir / "latest", tag)
    dist.barrier()
    return final


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete checkpoint, after checking every file it lists; ValueError says what is wrong."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"{folder} is not a complete checkpoint: it has no {MANIFEST} (a save that did not finish, "
                         "or a folder this recipe did not write).")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); the checkpoint is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest.")
    problems = []
    for name, size in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, {size} when saved (truncated?)")
    if not problems:
        problems = [f"{name} {problem}" for name in manifest["files"] if (problem := _unreadable(folder / name))]
    if problems:
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ValueError(f"checkpoint {folder} is damaged: {'; '.join(problems[:4])}{more}. Delete it to resume from "
                         "an older checkpoint, or restore it from a copy.")
    return manifest


def _unreadable(path: Path) -> str | None:
    """Why a checkpoint file of the right size cannot be what was saved, from its structure alone (no tensor bytes
    are read): a torch file must be a zip archive whose pickle is well formed, a safetensors file must have a valid
    header. DeepSpeed unpickles its files without such checks and fails deep inside pickle or safetensors."""
    if path.suffix == ".pt":
        try:
            with zipfile.ZipFile(path) as archive:
                pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                for _ in pickletools.genops(archive.read(pickle_name)):  # read() checks the CRC
                    pass
        except StopIteration:
            return "has no pickle (not a torch.save file)"
        except (zipfile.BadZipFile, ValueError, EOFError) as err:
            return f"is not a readable torch.save file ({' '.join(str(err).split())[:80]})"
    elif path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as err:
            return f"is not a readable safetensors file ({err})"
    return None


def prune_checkpoints(checkpoint_dir: Path, keep_last: int | None, keep_every: int | None = None) -> list[Path]:
    """Rank 0, after a save: remove complete checkpoints but the newest `keep_last`, those whose step is a multiple of
    `keep_every`, and the one `latest` names. Returns the removed ones.

    A checkpoint is first renamed to `step_XXXXXXXX.deleting` (atomic), so a process killed while deleting leaves a
    folder that resume and export never take for a checkpoint; the next prune finishes removing it."""
    for leftover in checkpoint_dir.glob(f"step_*{DELETING}"):
        shutil.rmtree(leftover)
    if keep_last is None:
        return []
    complete = list_checkpoints(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    keep = {*complete[-keep_last:], checkpoint_dir / latest.read_text().strip()} if latest.is_file() \
        else set(complete[-keep_last:])
    removed = []
    for path in complete:
        if path in keep or (keep_every is not None and int(_TAG.match(path.name).group(1)) % keep_every == 0):
            continue
        doomed = path.with_name(path.name + DELETING)
        os.rename(path, doomed)
        fsync_path(checkpoint_dir)
        shutil.rmtree(doomed)
        removed.append(path)
    return removed


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (step_XXXXXXXX with a manifest), oldest first. Files are checked when one is read."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _TAG.match(path.name)
        if not match or not path.is_dir():
            continue
        if (path / MANIFEST).is_file():
            found.append((int(match.group(1)), path))
        else:
            log.warning("ignoring %s: it has no %s, so this recipe did not finish writing it", path, MANIFEST)
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, checkpoint_dir: Path) -> ResumePoint | None:
    """The checkpoint to resume from, its files checked (`read_manifest`), or None for a fresh start.

    `auto`: the newest complete checkpoint in the run's own folder, if any; `none`: a fresh start; anything else: a
    checkpoint folder (step_XXXXXXXX) or a checkpoints folder (its newest complete one). Refuses any choice that
    would later overwrite a good checkpoint: a fresh start or an older resume point next to newer checkpoints.
    """
    stray = sorted(p.name for p in checkpoint_dir.glob("step_*") if _TAG.match(p.name) and not (p / MANIFEST).is_file())
    if stray:
        raise ValueError(f"{checkpoint_dir} holds {stray} without a {MANIFEST}, which this recipe never leaves (an "
                         "older version's checkpoint, or an unfinished copy); this run would overwrite them. Move "
                         "them out of that folder.")
    existing = list_checkpoints(checkpoint_dir)
    if resume == "none":
        if existing:
            raise ValueError(f"trainer.resume=none, but {checkpoint_dir} already holds checkpoints (newest: "
                             f"{existing[-1].name}); a fresh start there would overwrite them. Use a new "
                             "trainer.run_dir, or trainer.resume=auto to continue.")
        return None
    if resume == "auto":
        if not existing:
            return None
        path = existing[-1]
    else:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise ValueError(f"trainer.resume={resume!r}: no such folder. Point it at a checkpoint (step_XXXXXXXX) "
                             "or a checkpoints folder written by this recipe, or use resume=auto / resume=none.")
        if not (path / MANIFEST).is_file():
            found = list_checkpoints(path)
            if not found:
                raise ValueError(f"trainer.resume={resume!r}: no complete checkpoint there (no step_XXXXXXXX folder "
                                 f"with a {MANIFEST}). Point it at a checkpoint written by this recipe, or use "
                                 "resume=auto / resume=none.")
            path = found[-1]
    point = ResumePoint(path, read_manifest(path))
    newer = [p.name for p in existing if int(_TAG.match(p.name).group(1)) > point.step]
    if newer:
        raise ValueError(f"trainer.resume={resume!r} resumes from step {point.step}, but {checkpoint_dir} holds newer "
                         f"checkpoints {newer}: continuing would overwrite them and mix two runs. Use a new "
                         "trainer.run_dir for this run.")
    return point


def check_model_matches(manifest: dict, config: MoeConfig, folder: Path) -> None:
    """Raise a ValueError naming every architecture field where the checkpoint and this run's model differ."""
    saved = upgrade_config_dict(manifest["model"])
    defaults = inspect.signature(MoeConfig.__init__).parameters  # for a setting older checkpoints do not carry
    diffs = []
    for key in MoeConfig.architecture_settings:
        there, here = saved.get(key, defaults[key].default), getattr(config, key)
        if there != here:
            diffs.append(f"model.{model_setting_name(key)}={there!r} there, {here!r} here")
    if diffs:
        raise ValueError(f"checkpoint {folder} holds another model: {'; '.join(diffs)}. Resume with the model settings "
                         "it was trained with, or use a new trainer.run_dir to train this model from scratch.")


def _warn_changed_settings(manifest: dict, config: MoeConfig, folder: Path) -> None:
    """Routing and loss settings may change between jobs; say which did."""
    saved, current = upgrade_config_dict(manifest["model"]), json.loads(config.to_json_string(use_diff=False))
    changed = sorted(key for key in saved.keys() & current.keys() - _UNCOMPARED_KEYS if saved[key] != current[key])
    if changed:
        log.warning("resuming %s with changed model settings: %s", folder,
                    ", ".join(f"{key} {saved[key]!r} -> {current[key]!r}" for key in changed))


def check_resume(resume: str, checkpoint_dir: Path, config: MoeConfig, layout: dict | None = None
                 ) -> ResumePoint | None:
    """What the entry point runs before any process group exists: resolve trainer.resume and check the checkpoint
    (complete, undamaged, same model, and loadable at `layout`, the run's `planned_layout`, when given) so that a
    bad one stops every rank with one message. Says so when it passes over a newer save that did not finish. The
    manifest is read (and every file checked) once, here; pass the result to `load_checkpoint`."""
    point = resolve_resume(resume, checkpoint_dir)
    if point is not None:
        path, manifest = point.path, point.manifest
        check_model_matches(manifest, config, path)
        if layout is not None:
            check_layout_matches(manifest, layout, path)
        if manifest["scheduler"] is not None and "last_epoch" not in manifest["scheduler"]:
            raise ValueError(f"checkpoint {path} holds the LR schedule of DeepSpeed's WarmupCosineLR, which this "
                             "version replaced (moe_recipe/lr_schedule.py); resuming would restart the schedule. "
                             "Finish that run with the version that started it, or use a new trainer.run_dir.")
        tags = (_TAG.match(p.name.removesuffix(INCOMPLETE)) for p in path.parent.glob(f"step_*{INCOMPLETE}"))
        unfinished = sorted(f"{tag.group(0)}{INCOMPLETE}" for tag in tags
                            if tag and int(tag.group(1)) > manifest["step"])
        if unfinished:
            log.warning("resuming from %s, not from the newer %s: a save that did not finish (the job was killed "
                        "while writing it); the next checkpoint removes it", path, ", ".join(unfinished))
    return point


def _restore_rng(folder: Path, manifest: dict) -> None:
    rng_file = folder / f"rng_rank{dist.get_rank():05d}.pt"
    if manifest["layout"]["world_size"] == dist.get_world_size() and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # another world size: rank r's saved stream has no successor; draw a fresh one per (rank seed, step)
        torch.manual_seed((torch.initial_seed() + 1_000_003 * manifest["step"]) % 2**63)


def load_checkpoint(engine, resume: ResumePoint) -> int:
    """Restore model, optimizer, LR schedule, engine counters and RNG; return the step to continue from.

    At the layout the checkpoint was saved with this is DeepSpeed's own load; at any other (ep_size, world size,
    ZeRO stage, offload, precision) it sets every parameter and its Adam moments from the portable state. The
    manifest is `resume`'s, whose files `check_resume` checked: nothing is read twice.
    """
    folder, manifest = resume.path, resume.manifest
    check_model_matches(manifest, engine.module.config, folder)
    _warn_changed_settings(manifest, engine.module.config, folder)
    saved, layout = manifest["layout"], current_layout(engine)
    if manifest["tensors"] is not None:
        check_tensors_match(engine.module, manifest["tensors"], f"checkpoint {folder}")
    check_layout_matches(manifest, layout, folder)  # check_resume found it already, from the planned layout
    if saved == layout:
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint to load in {folder}.")
    else:
        log.info("checkpoint %s was saved at %s; this run is %s: loading its layout-independent state",
                 folder, saved, layout)
        load_portable_state(engine, folder, manifest["tensors"], manifest["optimizer"])
        scheduler = engine.lr_scheduler
        if scheduler is not None and manifest["scheduler"] is not None:
            # The schedule is a function of its position (steps taken). A native load restores the optimizer's lr
            # with its state; here stepping to the saved position sets it, in every param group of this layout.
            scheduler.last_epoch = manifest["scheduler"]["last_epoch"] - 1
            scheduler.step()
        counters = manifest["engine"]
        engine.global_steps = counters["global_steps"]
        engine.global_samples = counters["global_samples"]
        engine.skipped_steps = counters["skipped_steps"]
        dist.barrier()
    if manifest["train_batch_size"] != engine.train_batch_size():
        # The data position is the step: global sample g = step * global batch + ... (data.train_micro_batch).
        log.warning("the global batch changed from %d to %d sequences: this run reads its data from sample %d, not %d "
                    "where the checkpointed run stopped", manifest["train_batch_size"], engine.train_batch_size(),
                    manifest["step"] * engine.train_batch_size(), manifest["step"] * manifest["train_batch_size"])
    _restore_rng(folder, manifest)
    log.info("resumed from %s at step %d", folder, manifest["step"])
    return int(manifest["step"])
