"""Layout-independent training state: every parameter's fp32 master weight and Adam moments, under its global name,
and the model's persistent buffers (the expert bias, with router_expert_bias).

DeepSpeed's native MoE checkpoint ties the optimizer state to the layout it was saved with: ZeRO shards are flat
partitions of each rank's parameter groups, and which experts a rank holds depends on ep_size (its universal
checkpoint converter does not handle native MoE checkpoints, DeepSpeed issue #5716). Here each parameter is gathered
whole instead, with DeepSpeed's public `safe_get_full_*` helpers (they assemble ZeRO-1/2 partitions), and named as in
a model built with ep_size=1: local expert i of expert-parallel rank r is global expert r * num_local_experts + i.
Any layout then sets the parameters it holds (`safe_set_full_*`), and the export command reads the weights alone.
Persistent buffers are state the optimizer does not own (the expert bias moves by its own rule after each step) and
the same on every rank: written once, by rank 0, in their own dtype (DeepSpeed keeps fp32 buffers fp32 when it casts
the weights to bf16), and set on every rank at every layout.

Files, safetensors only, one per section (a decoder layer, the embedding, the head) and writer, under `portable/`:
    <section>.safetensors                         dense parameters, written by rank (section index % world size)
    <section>.experts_<first>-<last>.safetensors  one expert-parallel rank's experts, written by its expert-DP rank 0
    buffers.safetensors                           the persistent buffers (when the model has any), written by rank 0
Keys: `<global name>` for the fp32 weight or the buffer, `<state key>/<global name>` for the moments (exp_avg,
exp_avg_sq). The manifest's table marks buffers with `"buffer": true`.
"""

import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors import safe_open
from safetensors.torch import save_file

from .deepspeed_compat import (
    has_fp32_partition,
    links_fp32_partitions,
    own_persistent_buffers,
    rank_in_expert_data_parallel_group,
    rank_in_expert_parallel_group,
    relink_fp32_partitions,
)

PORTABLE_DIR = "portable"
BUFFERS_FILE = f"{PORTABLE_DIR}/buffers.safetensors"
_EXPERT_ID = re.compile(r"\.deepspeed_experts\.(\d+)\.")
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


@dataclass
class PortableParam:
    """One parameter of this rank's module, with the name and file it has in the layout-independent state."""

    name: str  # local name in engine.module
    global_name: str  # the name in a model with ep_size=1
    param: torch.nn.Parameter
    section: str
    file: str  # relative to the checkpoint folder
    writer: bool  # this rank writes it (every rank that holds it reads it back)


@dataclass
class PortableBuffer:
    """One persistent buffer of the module (not a parameter: no master weight, no moments)."""

    name: str  # in engine.module's state dict; the same as the global name (no buffer lives inside an expert)
    owner: torch.nn.Module
    attribute: str

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.attribute)


def portable_buffers(module: torch.nn.Module) -> list[PortableBuffer]:
    """The module's persistent buffers (what `state_dict` holds besides parameters), in `named_modules` order."""
    buffers = []
    for prefix, owner in module.named_modules():
        for attribute, _ in own_persistent_buffers(owner):
            name = f"{prefix}.{attribute}" if prefix else attribute
            assert not _EXPERT_ID.search(name), f"{name}: a buffer inside an expert would need its global id"
            buffers.append(PortableBuffer(name, owner, attribute))
    return buffers


def _section(name: str) -> str:
    layer = _LAYER.match(name)
    return layer.group(1) if layer else name.rsplit(".", 1)[0]


def _moe_layers(module: torch.nn.Module) -> dict[str, MoE]:
    return {prefix + ".": layer for prefix, layer in module.named_modules() if isinstance(layer, MoE)}


def _owner(name: str, moe_layers: dict[str, MoE]) -> MoE:
    return moe_layers[max((prefix for prefix in moe_layers if name.startswith(prefix)), key=len)]


def _with_expert_id(name: str, expert_id: int) -> str:
    return _EXPERT_ID.sub(f".deepspeed_experts.{expert_id}.", name, count=1)


def portable_params(module: torch.nn.Module) -> list[PortableParam]:
    """This rank's parameters in `named_parameters` order (the same on every rank: local names do not depend on it).

    Needs the process groups DeepSpeed creates at `deepspeed.initialize` (expert-parallel and expert-data-parallel).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    moe_layers = _moe_layers(module)
    sections: dict[str, int] = {}
    params = []
    for name, param in module.named_parameters():
        section = _section(name)
        sections.setdefault(section, len(sections))
        if is_moe_param(param):
            layer = _owner(name, moe_layers)
            first = rank_in_expert_parallel_group(layer.expert_group_name) * layer.num_local_experts
            global_name = _with_expert_id(name, first + int(_EXPERT_ID.search(name).group(1)))
            file = f"{PORTABLE_DIR}/{section}.experts_{first}-{first + layer.num_local_experts - 1}.safetensors"
            writer = rank_in_expert_data_parallel_group(layer.expert_group_name) == 0
        else:
            global_name = name
            file = f"{PORTABLE_DIR}/{section}.safetensors"
            writer = sections[section] % world_size == rank
        params.append(PortableParam(name, global_name, param, section, file, writer))
    return params


def expected_global_names(module: torch.nn.Module) -> set[str]:
    """Every global parameter name of the model (all experts, not only this rank's), from its local names, and its
    persistent buffers."""
    moe_layers = _moe_layers(module)
    names = set()
    for name, param in module.named_parameters():
        if is_moe_param(param):
            names.update(_with_expert_id(name, e) for e in range(_owner(name, moe_layers).num_experts))
        else:
            names.add(name)
    return names | {b.name for b in portable_buffers(module)}


def unsupported_reason(engine) -> str | None:
    """Why this engine's state cannot be written layout-independently, or None when it can."""
    if engine.zero_optimization_stage() > 2:
        return "ZeRO-3 partitions the weights themselves"
    backend = engine.module.config.backend_support
    if not backend.portable_checkpoint:
        return f"model.moe_backend={engine.module.config.moe_backend!r}: {backend.description} have none"
    return None


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed wraps (ZeRO points its groups at the flat fp32 partitions)."""
    optimizer = engine.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def ensure_optimizer_state(engine) -> None:
    """Make the optimizer state exist and link DeepSpeed's views of it, as after a first step.

    Torch's Adam creates its state at the first step and ZeRO links each parameter's slice of it only then, so a
    freshly built engine has nothing to load moments into. One step with zero gradients and lr 0 creates the state
    without moving any weight (AdamW: p *= 1 - 0 * wd, p -= 0 * update); its values are overwritten by the load.
    """
    optimizer = _torch_optimizer(engine)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not optimizer.state:
        saved_lrs = [group["lr"] for group in optimizer.param_groups]
        zeroed = [p for p in params if p.grad is None]
        for p in zeroed:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
        for group, lr in zip(optimizer.param_groups, saved_lrs):
            group["lr"] = lr
        for p in zeroed:
            p.grad = None
    assert all(p in optimizer.state for p in params), "optimizer state exists for some parameters only"
    if links_fp32_partitions(engine.optimizer):  # ZeRO-1/2, BF16_Optimizer
        # Every time, not once: DeepSpeed 0.19.8 links only the first group's views (see relink_fp32_partitions).
        relink_fp32_partitions(engine.optimizer)


class MasterState:
    """Where each model parameter's fp32 master weight and optimizer moments live, for the optimizers DeepSpeed builds.

    - ZeRO 1/2 (and DeepSpeed's BF16_Optimizer): fp32 partitions behind `param._hp_mapping`; the full tensor is
      gathered over the parameter's data-parallel group (the expert-data-parallel group for experts): a collective.
    - Stage 0, fp32: the torch optimizer holds the model parameters themselves.
    - Stage 0, bf16/fp16 (FP16_UnfusedOptimizer): an fp32 copy per parameter in `fp32_groups`.
    """

    def __init__(self, engine) -> None:
        self.optimizer = _torch_optimizer(engine)
        wrapper = engine.optimizer
        self.fp32_copy = {}
        if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                self.fp32_copy.update({lp: hp for lp, hp in zip(lp_group, hp_group)})
        elif wrapper is not self.optimizer and not links_fp32_partitions(wrapper):
            raise NotImplementedError(f"layout-independent checkpoints do not support DeepSpeed's "
                                      f"{type(wrapper).__name__}; use zero.stage 1 or 2, or fp32/bf16 at stage 0.")
        ensure_optimizer_state(engine)
        first_state = next(iter(self.optimizer.state.values()))
        self.state_keys = sorted(k for k, v in first_state.items() if torch.is_tensor(v) and v.dim() > 0)

    @staticmethod
    def partitioned(param: torch.nn.Parameter) -> bool:
        return has_fp32_partition(param)

    def get(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """{"param": fp32 weight, state key: moment}, each the full tensor. Collective for partitioned parameters."""
        if self.partitioned(param):
            full = {"param": safe_get_full_fp32_param(param)}
            full.update({key: safe_get_full_optimizer_state(param, key) for key in self.state_keys})
            return full
        master = self.fp32_copy.get(param, param)
        state = self.optimizer.state[master]
        return {"param": master.detach(), **{key: state[key] for key in self.state_keys}}

    def set(self, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        """Set this rank's part of the master weight and moments from full tensors, and the model's own copy."""
        if self.partitioned(param):
            safe_set_full_fp32_param(param, values["param"])
            for key in self.state_keys:
                safe_set_full_optimizer_state(param, values[key], key)
        else:
            master = self.fp32_copy.get(param, param)
            master.data.copy_(values["param"])
            state = self.optimizer.state[master]
            for key in self.state_keys:
                state[key].copy_(values[key])
        # ZeRO-1/2 and stage 0 keep the full (possibly low-precision) weight on every rank.
        param.data.copy_(values["param"])

    def step(self) -> int:
        return int(next(iter(self.optimizer.state.values()))["step"])

    def set_step(self, step: int) -> None:
        for state in self.optimizer.state.values():
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


def save_portable_state(engine, folder: Path) -> tuple[dict[str, dict], dict]:
    """Collective: write this rank's share of the state under `folder`.

    Returns the table of every rank's tensors ({global name: {"file", "shape"}}) and the optimizer summary.
    Every rank walks the same parameters in the same order, so the gathers inside `MasterState.get` match up.
    Writers keep one section at a time in memory (a decoder layer), never the whole model.
    """
    state = MasterState(engine)
    (folder / PORTABLE_DIR).mkdir(parents=True, exist_ok=True)
    params = portable_params(engine.module)
    table, pending = {}, {}
    for i, p in enumerate(params):
        full = state.get(p.param)
        if p.writer:
            tensors = pending.setdefault(p.file, {})
            tensors[p.global_name] = full["param"].detach().to("cpu", torch.float32, copy=True)
            for key in state.state_keys:
                tensors[f"{key}/{p.global_name}"] = full[key].detach().to("cpu", torch.float32, copy=True)
            table[p.global_name] = {"file": p.file, "shape": list(p.param.shape)}
        if i + 1 == len(params) or params[i + 1].section != p.section:
            for file, tensors in pending.items():
                save_file(tensors, str(folder / file), metadata={"format": "pt"})
            pending = {}
    buffers = portable_buffers(engine.module)
    if buffers and dist.get_rank() == 0:  # the same on every rank
        save_file({b.name: b.tensor.detach().to("cpu", copy=True) for b in buffers}, str(folder / BUFFERS_FILE),
                  metadata={"format": "pt"})
        table.update({b.name: {"file": BUFFERS_FILE, "shape": list(b.tensor.shape), "buffer": True} for b in buffers})
    tables = [None] * dist.get_world_size()
    dist.all_gather_object(tables, table)
    merged = {name: entry for rank_table in tables for name, entry in rank_table.items()}
    optimizer = {"class": type(state.optimizer).__name__, "step": state.step(), "state_keys": state.state_keys}
    return dict(sorted(merged.items())), optimizer


def check_tensors_match(module: torch.nn.Module, tensors: dict[str, dict], where: str) -> None:
    """Raise a ValueError naming the tensors (parameters, buffers) the checkpoint lacks, has in excess, or has in
    another shape."""
    expected = expected_global_names(module)
    problems = []
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) of this model, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) this model does not have, e.g. {unexpected[:3]}")
    shapes = [(p.global_name, p.param.shape) for p in portable_params(module)]
    shapes += [(b.name, b.tensor.shape) for b in portable_buffers(module)]
    for name, shape in shapes:
        entry = tensors.get(name)
        if entry is not None and list(entry["shape"]) != list(shape):
            problems.append(f"{name} has shape {entry['shape']} there, {list(shape)} here")
    if problems:
        raise ValueError(f"{where} does not fit this model: " + "; ".join(problems[:6]) + ".")


def load_portable_state(engine, folder: Path, tensors: dict[str, dict], optimizer: dict) -> None:
    """Set every parameter this rank holds, its moments and the buffers from the layout-independent state. No
    collectives.

    The caller has checked the table against the model (`check_tensors_match`).
    """
    state = MasterState(engine)
    if sorted(optimizer["state_keys"]) != state.state_keys:
        raise ValueError(f"checkpoint {folder} holds optimizer state {optimizer['state_keys']} ({optimizer['class']}); "
                         f"this run's {type(state.optimizer).__name__} keeps {state.state_keys}.")
    with ExitStack() as stack:
        files = {}
        for p in portable_params(engine.module):
            file = tensors[p.global_name]["file"]
            if file not in files:
                files[file] = stack.enter_context(safe_open(str(folder / file), framework="pt", device="cpu"))
            reader = files[file]
            values = {"param": reader.get_tensor(p.global_name)}
            values.update({key: reader.get_tensor(f"{key}/{p.global_name}") for key in state.state_keys})
            state.set(p.param, values)
    state.set_step(optimizer["step"])
    load_buffers(engine.module, folder, tensors)


def load_buffers(module: torch.nn.Module, folder: Path, tensors: dict[str, dict]) -> None:
    """Set the persistent buffers from the layout-independent state (DeepSpeed's own same-layout load sets them from
    its module states)."""
    buffers = portable_buffers(module)
    if not buffers:
        return
    with safe_open(str(folder / tensors[buffers[0].name]["file"]), framework="pt", device="cpu") as reader:
        for b in buffers:
            b.tensor.copy_(reader.get_tensor(b.name))


def read_weights(folder: Path, tensors: dict[str, dict]) -> dict[str, torch.Tensor]:
    """All fp32 weights and the buffers by global name (the export path: no engine, no process group)."""
    weights = {}
    by_file: dict[str, list[str]] = {}
    for name, entry in tensors.items():
        by_file.setdefault(entry["file"], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(folder / file), framework="pt", device="cpu") as reader:
            for name in names:
                weights[name] = reader.get_tensor(name)
    return weights


__all__ = [
    "MasterState",
    "PortableBuffer",
    "PortableParam",
    "check_tensors_match",
    "ensure_optimizer_state",
    "expected_global_names",
    "load_buffers",
    "load_portable_state",
    "portable_buffers",
    "portable_params",
    "read_weights",
    "save_portable_state",
    "unsupported_reason",
]
