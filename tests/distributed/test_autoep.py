"""moe_backend=autoep trains like moe_backend=deepspeed: DeepSpeed AutoEP (dropless, grouped GEMM) at EP 1 and 2,
with ZeRO 0, 2 and 3, gives the losses, router statistics and clipped grad norms of the native MoE layer without
drops, through the recipe's config and engine wiring. Gloo on CPU: AutoEP has CPU paths for everything it does here.
"""

from pathlib import Path

import pytest
import torch

from tests.helpers import torchrun

WORKER = Path(__file__).with_name("autoep_worker.py")
pytestmark = pytest.mark.distributed


def train(tmp_path: Path, world: int, runs: list[str]) -> dict[str, dict]:
    out = tmp_path / f"world{world}.pt"
    torchrun(WORKER, world, ["--runs", *runs, "--out", str(out)])
    return torch.load(out, weights_only=False)


def test_autoep_trains_like_the_native_backend(tmp_path):
    # backend:zero_stage:ep_size; world 2 with ep_size 1 is AutoEP's replicated experts under ZeRO-3 data parallelism.
    one = train(tmp_path, world=1, runs=["deepspeed:0:1", "autoep:0:1"])
    two = train(tmp_path, world=2, runs=["deepspeed:2:2", "autoep:2:2", "autoep:3:2", "autoep:3:1"])
    reference = torch.tensor(one["deepspeed:0:1"]["losses"])  # [step, (loss, lm_loss, aux_loss, z_loss)]
    assert reference[-1, 0] < reference[0, 0], "the runs must train for their agreement to mean anything"
    native_two = two["deepspeed:2:2"]
    assert min(native_two["grad_norms"]) > 0.05, "clipping must be active for the grad norms to matter"

    for world, results, native in ((1, one, one["deepspeed:0:1"]), (2, two, native_two)):
        for run, result in results.items():
            losses = torch.tensor(result["losses"])
            # The aux loss is DeepSpeed's per-rank formula (reported, not trained on): compare it within a world size.
            torch.testing.assert_close(losses[:, [0, 1, 3]], reference[:, [0, 1, 3]], rtol=1e-5, atol=1e-6, msg=run)
            torch.testing.assert_close(losses[:, 2], torch.tensor(native["losses"])[:, 2], rtol=1e-5, atol=1e-6,
                                       msg=run)
            assert torch.equal(result["tokens_per_expert"], one["deepspeed:0:1"]["tokens_per_expert"]), run
            if world == 2:
                torch.testing.assert_close(result["grad_norms"], native["grad_norms"], rtol=1e-5, atol=1e-6, msg=run)
