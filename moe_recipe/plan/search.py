"""Fixes for a layout that does not fit: the recipe's own settings, tried in order of what they cost in throughput,
each one re-planned. A plain loop over candidate changes; nothing here is called back by the plan."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .build import NotModeledError, build_plan
from .hardware import ClusterSpec

if TYPE_CHECKING:
    from ..config import RecipeConfig

# {config section: {field: value}}, e.g. {"zero": {"stage": 2}}
Change = dict[str, dict[str, Any]]


def candidate_changes(cfg: RecipeConfig, cluster: ClusterSpec) -> list[Change]:
    """Changes to try, cheapest in throughput first."""
    t, z, num_experts = cfg.trainer, cfg.zero, cfg.model.num_experts
    changes: list[Change] = []
    if z.stage < 2:
        changes.append({"zero": {"stage": 2}})
    if not t.activation_checkpointing:
        changes.append({"trainer": {"activation_checkpointing": True}})
    larger_ep = [d for d in range(cfg.parallel.ep_size + 1, num_experts + 1)
                 if num_experts % d == 0 and cluster.world_size % d == 0]
    changes += [{"parallel": {"ep_size": ep}} for ep in larger_ep[:2]]
    if t.micro_batch_size > 1:  # the same global batch in more micro steps
        mb = t.micro_batch_size // 2
        ga = t.grad_accum * t.micro_batch_size // mb if t.micro_batch_size % mb == 0 else t.grad_accum * 2
        changes.append({"trainer": {"micro_batch_size": mb, "grad_accum": ga}})
    if not z.offload_optimizer:
        changes.append({"zero": {"stage": 2, "offload_optimizer": True}})
    return changes


def as_overrides(change: Change) -> list[str]:
    """The Hydra overrides a user adds for `change`."""
    return [f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for section, values in change.items() for key, value in values.items()]


def apply_change(cfg: RecipeConfig, change: Change) -> RecipeConfig:
    return dataclasses.replace(cfg, **{
        section: dataclasses.replace(getattr(cfg, section), **values) for section, values in change.items()})


def fits(cfg: RecipeConfig, cluster: ClusterSpec, tokenizer_vocab_size: int | None) -> bool:
    try:
        return build_plan(cfg, cluster, tokenizer_vocab_size).fits
    except (ValueError, NotModeledError):  # a change that makes the layout invalid is no fix
        return False


def find_fixes(cfg: RecipeConfig, cluster: ClusterSpec, tokenizer_vocab_size: int | None = None,
               max_fixes: int = 3) -> list[list[str]]:
    """Overrides that make the layout fit: up to `max_fixes` single changes that do, else one stack of the changes,
    added in order until it fits; [] when nothing tried fits."""
    candidates = candidate_changes(cfg, cluster)
    fixes = []
    for change in candidates:
        if fits(apply_change(cfg, change), cluster, tokenizer_vocab_size):
            fixes.append(as_overrides(change))
            if len(fixes) == max_fixes:
                break
    if fixes:
        return fixes
    stack: Change = {}
    for change in candidates:
        for section, values in change.items():
            stack[section] = {**stack.get(section, {}), **values}
        if fits(apply_change(cfg, stack), cluster, tokenizer_vocab_size):
            return [as_overrides(stack)]
    return []


__all__ = ["as_overrides", "candidate_changes", "find_fixes"]
