"""A checkpoint written by an earlier version still resumes: tests/fixtures/checkpoint_1c2808b holds a run of main
1c2808b (before the router state, the model-file split and the split of router.balance) stopped at step 10, and the
metrics of that run carried on uninterrupted to step 20. Today's code resumes it through the entry point, at the
layout it was saved with (DeepSpeed's own load) and at another (the portable state), and trains steps 11-20 to the
old run's losses and expert bias."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, run_command, torchrun, train_rows

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_1c2808b"
TRAIN = REPO / "recipes" / "train.py"
pytestmark = pytest.mark.e2e

# The fixture's settings in today's names (its README has the command of 1c2808b): the checkpoint's own config says
# router_balance="bias+sequence" and carries eval_capacity_factor, both read as they were meant.
MODEL = ["model.vocab_size=320", "model.hidden_size=16", "model.intermediate_size=32", "model.moe_intermediate_size=16",
         "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
         "model.max_position_embeddings=32", "model.num_experts=4", "model.num_experts_per_tok=2",
         "model.first_k_dense_replace=1", "model.num_shared_experts=1", "model.router.balance=sequence",
         "model.router.expert_bias=true", "model.router.score_func=sigmoid", "model.router.bias_update_rate=0.01",
         "model.router_aux_loss_coef=0.001"]
RUN = ["data.seq_len=32", "trainer.micro_batch_size=2", "trainer.max_steps=20", "optim.warmup_steps=2",
       "trainer.log_interval=1", "trainer.eval_interval=10", "trainer.eval_batches=2", "trainer.checkpoint_interval=10",
       "trainer.heatmap_interval=null"]


def old_run(tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the fixture's run directory (the test must not write into the repository) without its metrics,
    and the overrides that resume it."""
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", run_dir / "checkpoints")
    args = [*MODEL, *RUN, f"data.tokenizer={FIXTURE / 'tokenizer'}", f"data.cache_dir={tmp_path / 'cache'}",
            f"trainer.run_dir={run_dir}"]
    return run_dir, args


@pytest.mark.parametrize("world, ep_size, tolerance", [
    pytest.param(2, 2, 1e-6, id="same-layout-deepspeed-load"),
    pytest.param(1, 1, 3e-5, id="ep1-portable-state"),
])
def test_a_checkpoint_of_main_1c2808b_resumes_to_its_losses(tmp_path, world, ep_size, tolerance):
    run_dir, args = old_run(tmp_path)
    # The same global batch of 4 sequences in micro batches of 2 at both layouts: the same tokens meet the capacity.
    args += [f"parallel.ep_size={ep_size}", f"trainer.grad_accum={2 // world}"]
    if world == 1:
        proc = run_command([sys.executable, str(TRAIN), *args])
    else:
        proc = torchrun(TRAIN, world, args)
    assert "resumed from" in proc.stdout + proc.stderr
    rows, reference = train_rows(run_dir), train_rows(FIXTURE)
    assert sorted(rows) == list(range(11, 21)), "the run must resume at step 10 and train to step 20"
    for step in range(11, 21):
        for key in ("train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss"):
            assert rows[step][key] == pytest.approx(reference[step][key], rel=tolerance, abs=0), (step, key)
        bias = {key: value for key, value in rows[step].items() if "expert_bias_" in key}
        assert bias and bias == pytest.approx({key: reference[step][key] for key in bias}, abs=1e-7), step
    # The expert bias moved over the resumed steps: the comparison covers the bias restored from the checkpoint.
    assert rows[20]["routing/layer_1/expert_bias_max"] != rows[11]["routing/layer_1/expert_bias_max"]
    saved = json.loads((run_dir / "checkpoints" / "step_00000020" / "checkpoint.json").read_text())["model"]
    assert (saved["router_balance"], saved["router_expert_bias"]) == ("sequence", True)
    assert "eval_capacity_factor" not in saved
