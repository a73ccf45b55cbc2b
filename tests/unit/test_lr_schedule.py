"""The learning-rate schedules: the first step trains, the peak is optim.lr at the end of warmup, the last step sits
at lr * min_lr_ratio; the LambdaLR that DeepSpeed steps gives those values, and bad settings say what to change."""

import math

import pytest
import torch

from moe_recipe.config import OptimConfig, validate_schedule
from moe_recipe.lr_schedule import build_lr_scheduler, lr_factor

LR, MIN_RATIO = 3e-3, 0.1


def factors(schedule: str, total_steps: int, warmup_steps: int, decay_fraction: float = 0.1) -> list[float]:
    """lr_factor for steps 1..total_steps."""
    return [lr_factor(s, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                      min_lr_ratio=MIN_RATIO, decay_fraction=decay_fraction) for s in range(1, total_steps + 1)]


def trained_lrs(schedule: str, total_steps: int, warmup_steps: int, decay_fraction: float = 0.1) -> list[float]:
    """The lr each optimizer step actually uses, with the scheduler stepped after each step as DeepSpeed does."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=LR)
    scheduler = build_lr_scheduler(optimizer, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                                   min_lr_ratio=MIN_RATIO, decay_fraction=decay_fraction)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_warmup_starts_above_zero_and_peaks_at_lr_at_its_last_step(schedule):
    lrs = trained_lrs(schedule, total_steps=20, warmup_steps=4)
    assert lrs[:4] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR], rel=1e-12)  # steps 1..4
    assert max(lrs) == pytest.approx(LR, rel=1e-12)
    assert lrs[-1] == pytest.approx(LR * MIN_RATIO, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_without_warmup_the_first_step_trains_at_lr(schedule):
    lrs = trained_lrs(schedule, total_steps=10, warmup_steps=0)
    assert lrs[0] == pytest.approx(LR, rel=1e-12)
    assert lrs[-1] == pytest.approx(LR * MIN_RATIO, rel=1e-12)


def test_cosine_between_warmup_and_the_end():
    got = factors("cosine", total_steps=12, warmup_steps=2)
    # Step 7 is halfway from the peak (step 2) to the end (step 12): the cosine's midpoint.
    assert got[6] == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) / 2)
    assert got[3] == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * 2 / 10)))
    assert all(a > b for a, b in zip(got[1:], got[2:]))  # decreasing after the peak


def test_wsd_holds_lr_then_decays_linearly_over_the_last_fraction():
    got = factors("wsd", total_steps=20, warmup_steps=2, decay_fraction=0.2)  # decay over steps 17..20
    assert got[1:16] == [1.0] * 15  # steps 2..16
    step = (1 - MIN_RATIO) / 4
    assert got[16:] == pytest.approx([1 - step, 1 - 2 * step, 1 - 3 * step, MIN_RATIO])


def test_the_lr_after_the_last_step_stays_at_the_end_value():
    for schedule in ("cosine", "wsd"):
        assert lr_factor(11, schedule=schedule, total_steps=10, warmup_steps=2, min_lr_ratio=MIN_RATIO,
                         decay_fraction=0.1) == pytest.approx(MIN_RATIO)


def test_scheduler_state_resumes_at_its_position():
    """A fresh scheduler loaded with a saved state continues with the same lr as the uninterrupted one."""
    expected = trained_lrs("cosine", total_steps=10, warmup_steps=3)
    param = torch.nn.Parameter(torch.zeros(2))
    make = lambda optimizer: build_lr_scheduler(optimizer, schedule="cosine", total_steps=10,  # noqa: E731
                                                warmup_steps=3, min_lr_ratio=MIN_RATIO, decay_fraction=0.1)
    first = torch.optim.AdamW([param], lr=LR)
    scheduler = make(first)
    for _ in range(6):
        first.step()
        scheduler.step()
    second = torch.optim.AdamW([param], lr=LR)
    resumed = make(second)
    resumed.load_state_dict(scheduler.state_dict())
    second.load_state_dict(first.state_dict())  # a native checkpoint restores the optimizer's lr with its state
    got = []
    for _ in range(4):
        got.append(second.param_groups[0]["lr"])
        second.step()
        resumed.step()
    assert got == pytest.approx(expected[6:], rel=1e-12)


@pytest.mark.parametrize(
    "settings, total_steps, message",
    [
        (dict(schedule="linear"), 10, "optim.schedule='linear' is unknown"),
        (dict(lr=0.0), 10, "optim.lr=0.0 must be > 0"),
        (dict(min_lr_ratio=1.5), 10, r"optim.min_lr_ratio=1.5 must lie in \[0, 1\]"),
        (dict(warmup_steps=-1), 10, "optim.warmup_steps=-1 must be >= 0"),
        (dict(warmup_steps=10), 10, "optim.warmup_steps=10 must be below the number of steps 10"),
        (dict(schedule="wsd", decay_fraction=0.0), 10, r"optim.decay_fraction=0.0 must lie in \(0, 1\]"),
        (dict(schedule="wsd", warmup_steps=8, decay_fraction=0.3), 10, "lower optim.warmup_steps or optim.decay"),
    ],
)
def test_bad_schedule_settings_say_what_to_change(settings, total_steps, message):
    with pytest.raises(ValueError, match=message):
        validate_schedule(OptimConfig(**{"warmup_steps": 2, **settings}), total_steps)


def test_wsd_without_a_stable_phase_is_valid():
    validate_schedule(OptimConfig(schedule="wsd", warmup_steps=7, decay_fraction=0.3), total_steps=10)
    assert factors("wsd", total_steps=10, warmup_steps=7, decay_fraction=0.3)[6:] == pytest.approx(
        [1.0, 1 - (1 - MIN_RATIO) / 3, 1 - 2 * (1 - MIN_RATIO) / 3, MIN_RATIO])
