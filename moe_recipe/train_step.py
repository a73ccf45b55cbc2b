"""One optimizer step: the function the Trainer, the layout tests and the planner's engine check all run."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .engine import clip_grad_norm
from .metrics import LOSSES


@dataclass
class StepResult:
    losses: torch.Tensor  # [micro steps, len(LOSSES)] this rank's losses of each micro batch, detached, on the device
    lr: float  # the learning rate this step trained with (the scheduler moves on after it)
    grad_norm: float | torch.Tensor | None  # before clipping; None where DeepSpeed keeps none (ZeRO 0, no clipping)


def train_step(engine, micro_batches: Iterable[torch.Tensor], recipe_grad_clip: float | None = None) -> StepResult:
    """Forward and backward over each micro batch of this rank's share of the global batch (DeepSpeed reduces the
    gradients after the last), the optimizer step, then the routers' post-step: with the expert bias, one
    all_reduce of the step's load and the bias update on every rank.

    `recipe_grad_clip`: clip by the norm of the whole gradient here (`engine.clip_grad_norm`) instead of DeepSpeed,
    where the recipe does (`engine.recipe_clips_gradients`); None: DeepSpeed clips as its config says.
    """
    lr = engine.get_lr()[0]
    losses, grad_norm = [], None
    for input_ids in micro_batches:
        out = engine(input_ids=input_ids, labels=input_ids)
        engine.backward(out.loss)
        if recipe_grad_clip is not None and engine.is_gradient_accumulation_boundary():
            grad_norm = clip_grad_norm(engine.module, recipe_grad_clip)
        engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
        losses.append(torch.stack([getattr(out, name) for name in LOSSES]).detach().float())
    engine.module.post_step()
    if recipe_grad_clip is None:
        grad_norm = engine.get_global_grad_norm()  # DeepSpeed's, computed in its step
    return StepResult(losses=torch.stack(losses), lr=lr, grad_norm=grad_norm)
