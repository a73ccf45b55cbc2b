"""Evaluation does not depend on the parallel layout: the same weights give the same eval loss at world 1 (EP 1),
world 2 (EP 2) and world 4 (EP 2 x DP 2), in fp32, for both MoE backends. The eval rows are the same at every world
size (ranks that run out of rows evaluate padding, left out of the loss) and evaluation never drops tokens, even
where training would."""

import json
import math
from pathlib import Path

import pytest

from tests.helpers import torchrun

WORKER = Path(__file__).with_name("eval_worker.py")
pytestmark = pytest.mark.distributed


def evaluate(tmp_path: Path, world: int, jobs: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
    """{(moe_backend, ep_size): eval loss} of one torchrun launch of `world` processes."""
    specs = [{"moe_backend": backend, "ep_size": ep_size, "out": str(tmp_path / f"w{world}_{backend}_ep{ep_size}.json")}
             for backend, ep_size in jobs]
    torchrun(WORKER, world, ["--jobs", json.dumps(specs), "--store", str(tmp_path / f"store{world}")])
    return {(s["moe_backend"], s["ep_size"]): json.loads(Path(s["out"]).read_text())["eval/loss"] for s in specs}


def test_eval_loss_is_the_same_at_every_layout(tmp_path):
    losses = {1: evaluate(tmp_path, 1, [("deepspeed", 1), ("autoep", 1)]),
              2: evaluate(tmp_path, 2, [("deepspeed", 2), ("autoep", 2)]),
              4: evaluate(tmp_path, 4, [("deepspeed", 2), ("autoep", 2)])}
    reference = losses[1][("deepspeed", 1)]
    assert abs(reference - math.log(128)) < 0.5, "a fresh model should be about as good as chance"
    for world, results in losses.items():
        for job, loss in results.items():
            assert loss == pytest.approx(reference, abs=1e-6), (world, job, losses)
