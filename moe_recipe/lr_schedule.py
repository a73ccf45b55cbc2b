"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

Steps count optimizer steps from 1: step 1 is the first update. With W warmup steps and N steps in all,
- warmup: step s trains at lr * s / W, so step 1 already moves the weights and step W (the peak) trains at lr
  exactly; without warmup the peak is step 1;
- cosine: from lr at the peak down to lr * min_lr_ratio at step N, along half a cosine;
- wsd: lr until the last `decay_steps` steps, then a linear decay to lr * min_lr_ratio at step N.

WSD is MiniCPM's schedule (Hu et al., 2024; they decay exponentially); the decay here is linear over the last
fraction of the run, 10% by default, as in OLMo-core's `WSD` scheduler. A WSD run can be continued past its planned end from a checkpoint taken before
the decay, and its stable phase does not depend on the length of the run.

DeepSpeed steps the scheduler once per optimizer step (not per micro step, and not after a step an fp16 overflow
skipped). torch's `LambdaLR` calls its function with the number of steps taken so far, 0 for the first update, which
is why it is shifted by one below. transformers' schedules (`get_cosine_with_min_lr_schedule_with_warmup`, ...) use
the same 0-based count without the shift: their first update trains at lr 0, the defect this module replaces.
"""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "wsd")


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """WSD's decay phase: the last `decay_fraction` of the steps, at least one."""
    return max(1, round(decay_fraction * total_steps))


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int, min_lr_ratio: float,
              decay_fraction: float) -> float:
    """The multiple of optim.lr that optimizer step `step` (1 to total_steps) trains with."""
    # LambdaLR evaluates one step past the last after the final update; hold the final value there.
    step = min(step, total_steps)
    if step < warmup_steps:
        return step / warmup_steps
    peak = max(warmup_steps, 1)  # the last warmup step; without warmup, the first step trains at lr
    if schedule == "cosine":
        progress = (step - peak) / max(total_steps - peak, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(total_steps - decay_steps(total_steps, decay_fraction), peak)
    if step <= decay_start:
        return 1.0
    progress = (step - decay_start) / (total_steps - decay_start)
    return 1 - (1 - min_lr_ratio) * progress


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int, warmup_steps: int,
                       min_lr_ratio: float, decay_fraction: float) -> LambdaLR:
    """A LambdaLR whose k-th value (k steps taken) is the lr of step k + 1; its state is its position."""

    def factor(steps_taken: int) -> float:
        return lr_factor(steps_taken + 1, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction)

    return LambdaLR(optimizer, factor)


__all__ = ["SCHEDULES", "build_lr_scheduler", "decay_steps", "lr_factor"]
