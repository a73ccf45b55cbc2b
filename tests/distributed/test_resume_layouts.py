"""A checkpoint resumes at another expert-parallel layout, world size and ZeRO stage as if nothing had changed.

For each (saved layout -> resumed layout) and ZeRO stage: a run trains 6 steps at the saved layout, checkpointing
at step 3; a second run resumes that checkpoint at the new layout and trains steps 4-6. Its losses, learning rates
and grad norms, and its final weights and Adam moments (each expert's own), must equal the first run's.
The jobs of each world size share one torchrun launch (see resume_worker.py): three launches in all.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import torchrun, train_rows

WORKER = Path(__file__).with_name("resume_worker.py")
pytestmark = pytest.mark.distributed

SAVE_STEP, STEPS = 3, 6
STAGES = (0, 1, 2)
# name: ((world size, ep_size) saved at, (world size, ep_size) resumed at); world 4 with ep 2 is EP 2 x DP 2.
CASES = {
    "ep2_to_ep4": ((2, 2), (4, 4)),
    "ep4_to_ep1": ((4, 4), (1, 1)),
    "ep2xdp2_to_ep4": ((4, 2), (4, 4)),
}
# Beyond the stage matrix, (saved, resumed) jobs: ZeRO-Offload into EP 2 x DP 2 (experts partitioned over their
# expert-data-parallel pair), with the WSD schedule decaying over the resumed steps 4-6; bf16 weights resumed at
# another layout and ZeRO stage; and the expert bias (a buffer, updated after every step) resumed at another layout
# (DeepSeek-V3's routing: sigmoid scores, one group of 2 experts = one EP rank per token, bias + sequence loss) and
# at the same layout through DeepSpeed's own load, in bf16 (DeepSpeed casts the weights, not the fp32 buffers).
WSD = {"schedule": "wsd", "decay_fraction": 0.5}
DEEPSEEK_V3_ROUTING = {"router": {"balance": "sequence", "expert_bias": True, "score_func": "sigmoid",
                                  "norm_topk_prob": True, "scaling_factor": 2.5, "n_group": 2, "topk_group": 1},
                       "router_aux_loss_coef": 1e-3}
BIAS = {"router": {"balance": "none", "expert_bias": True}, "router_aux_loss_coef": 0.0}
OTHER_CASES = {
    "offload_ep2_to_ep2xdp2": ({"world": 2, "ep_size": 2, "zero_stage": 2, "offload": True, "optim": WSD},
                               {"world": 4, "ep_size": 2, "zero_stage": 2, "offload": True, "optim": WSD}),
    "bf16_ep2z2_to_ep1z1": ({"world": 2, "ep_size": 2, "zero_stage": 2, "precision": "bf16"},
                            {"world": 1, "ep_size": 1, "zero_stage": 1, "precision": "bf16"}),
    "bias_ep2_to_ep1": ({"world": 2, "ep_size": 2, "zero_stage": 1, "model": DEEPSEEK_V3_ROUTING},
                        {"world": 1, "ep_size": 1, "zero_stage": 1, "model": DEEPSEEK_V3_ROUTING}),
    "bias_bf16_ep2_same_layout": ({"world": 2, "ep_size": 2, "zero_stage": 2, "precision": "bf16", "model": BIAS},
                                  {"world": 2, "ep_size": 2, "zero_stage": 2, "precision": "bf16", "model": BIAS}),
}
SCRAMBLED = "ep2_to_ep4_z2"  # its checkpoint with two experts' moments swapped: the comparison must catch it


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def swap_expert_moments(source: Path, target: Path, first: int, second: int) -> None:
    """Copy a checkpoint, swapping the Adam moments (not the weights) of two experts in every MoE layer."""
    shutil.copytree(source, target)
    files = {}
    for file in (target / "portable").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as reader:
            files[file] = {key: reader.get_tensor(key) for key in reader.keys()}
    merged = {key: (file, tensor) for file, tensors in files.items() for key, tensor in tensors.items()}
    for key, (file, _) in merged.items():
        if key.startswith("exp_avg") and f".deepspeed_experts.{first}." in key:
            other = key.replace(f".deepspeed_experts.{first}.", f".deepspeed_experts.{second}.")
            other_file = merged[other][0]
            files[file][key], files[other_file][other] = merged[other][1], merged[key][1]
    for file, tensors in files.items():
        save_file(tensors, str(file), metadata={"format": "pt"})  # same keys and shapes: same size as the manifest's


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    jobs = {world: {"save": [], "resume": []} for world in (1, 2, 4)}

    def add(name: str, saved: dict, resumed: dict) -> None:
        saved, resumed = dict(saved), dict(resumed)
        jobs[saved.pop("world")]["save"].append({**saved, "run_dir": str(root / f"{name}_save"),
                                                  "checkpoint_interval": SAVE_STEP})
        jobs[resumed.pop("world")]["resume"].append({**resumed, "run_dir": str(root / f"{name}_resume"),
                                                      "resume": str(checkpoint(root / f"{name}_save", SAVE_STEP))})

    for case, ((save_world, save_ep), (resume_world, resume_ep)) in CASES.items():
        for stage in STAGES:
            add(f"{case}_z{stage}", {"world": save_world, "ep_size": save_ep, "zero_stage": stage},
                {"world": resume_world, "ep_size": resume_ep, "zero_stage": stage})
    for case, (saved, resumed) in OTHER_CASES.items():
        add(case, saved, resumed)
    scrambled = root / "scrambled_checkpoint"
    jobs[4]["resume"].append({"run_dir": str(root / "scrambled_resume"), "ep_size": 4, "zero_stage": 2,
                              "resume": str(scrambled)})
    # World 2 saves; world 4 resumes those, saves and resumes its own; world 1 resumes world 4's.
    torchrun(WORKER, 2, ["--jobs", json.dumps(jobs[2]["save"] + jobs[2]["resume"])], timeout=900)
    swap_expert_moments(checkpoint(root / f"{SCRAMBLED}_save", SAVE_STEP), scrambled, first=0, second=3)
    torchrun(WORKER, 4, ["--jobs", json.dumps(jobs[4]["save"] + jobs[4]["resume"])], timeout=900)
    torchrun(WORKER, 1, ["--jobs", json.dumps(jobs[1]["save"] + jobs[1]["resume"])], timeout=900)
    return root


def portable_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight and moment of a checkpoint's layout-independent state, by key."""
    tensors = {}
    for file in (folder / "portable").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as reader:
            tensors.update({key: reader.get_tensor(key) for key in reader.keys()})
    return tensors


def mismatches(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ beyond float32 round-off of a different reduction order (Adam's normalization
    turns it into weight differences of a few 1e-6 over 6 steps at lr 1e-2; swapped moments move weights by ~1e-3)."""
    return [key for key, tensor in reference.items() if not torch.allclose(state[key], tensor, rtol=1e-4, atol=3e-5)]


def assert_resumed_like_uninterrupted(saved: Path, resumed: Path) -> None:
    expected, got = train_rows(saved), train_rows(resumed)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert sorted(got) == list(range(SAVE_STEP + 1, STEPS + 1))
    for step, row in got.items():
        for key in ("train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss", "train/lr", "train/grad_norm"):
            if key in expected[step]:  # DeepSpeed keeps no grad norm at ZeRO stage 0
                assert row[key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
    final = json.loads((checkpoint(resumed, STEPS) / "checkpoint.json").read_text())
    assert final["optimizer"]["step"] == STEPS and final["scheduler"]["last_epoch"] == STEPS
    # Every weight and moment, each expert's under its global id, ends where the uninterrupted run's did.
    reference, state = portable_tensors(checkpoint(saved, STEPS)), portable_tensors(checkpoint(resumed, STEPS))
    assert state.keys() == reference.keys()
    assert sum(".deepspeed_experts.3." in key for key in state) == 3 * 3 * 2  # 3 projections x 3 tensors x 2 layers
    assert mismatches(state, reference) == []


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", CASES)
def test_resume_at_another_layout_matches_the_uninterrupted_run(runs, case, stage):
    saved, resumed = runs / f"{case}_z{stage}_save", runs / f"{case}_z{stage}_resume"
    assert_resumed_like_uninterrupted(saved, resumed)
    (save_world, save_ep), (resume_world, resume_ep) = CASES[case]
    for run, world, ep in ((saved, save_world, save_ep), (resumed, resume_world, resume_ep)):
        layout = json.loads((checkpoint(run, STEPS) / "checkpoint.json").read_text())["layout"]
        assert (layout["world_size"], layout["ep_size"], layout["zero_stage"]) == (world, ep, stage)


def test_zero_offload_resume_into_ep2xdp2_matches_the_uninterrupted_run(runs):
    assert_resumed_like_uninterrupted(runs / "offload_ep2_to_ep2xdp2_save", runs / "offload_ep2_to_ep2xdp2_resume")
    layout = json.loads((checkpoint(runs / "offload_ep2_to_ep2xdp2_resume", STEPS) / "checkpoint.json").read_text())
    assert layout["layout"]["offload_optimizer"] and layout["layout"]["world_size"] == 4
    # WSD, lr 1e-2, warmup 2, decay over the last half: steps 1-6 at 0.5, 1, 1, then linearly down to 0.1 of lr.
    lrs = [row["train/lr"] for _, row in sorted(train_rows(runs / "offload_ep2_to_ep2xdp2_resume").items())]
    assert lrs == pytest.approx([1e-2 * 0.7, 1e-2 * 0.4, 1e-2 * 0.1], rel=1e-12)


def test_bf16_resume_at_another_layout_and_zero_stage(runs):
    """bf16 at EP 2, ZeRO-2 -> EP 1, ZeRO-1: the first resumed step sees exactly the saved weights (the bf16 copy of
    the fp32 masters); later steps agree up to bf16 round-off of another summation order."""
    expected, got = train_rows(runs / "bf16_ep2z2_to_ep1z1_save"), train_rows(runs / "bf16_ep2z2_to_ep1z1_resume")
    saved = json.loads((checkpoint(runs / "bf16_ep2z2_to_ep1z1_save", SAVE_STEP) / "checkpoint.json").read_text())
    assert saved["layout"]["dtype"] == "bfloat16"
    assert got[SAVE_STEP + 1]["train/loss"] == pytest.approx(expected[SAVE_STEP + 1]["train/loss"], rel=1e-6)
    for step in range(SAVE_STEP + 2, STEPS + 1):
        assert got[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-4)
        assert got[step]["train/lr"] == pytest.approx(expected[step]["train/lr"], rel=1e-9)


def expert_bias(folder: Path) -> dict[str, torch.Tensor]:
    """The expert bias of each MoE layer in a checkpoint's layout-independent state."""
    manifest = json.loads((folder / "checkpoint.json").read_text())
    buffers = {name for name, entry in manifest["tensors"].items() if entry.get("buffer")}
    tensors = portable_tensors(folder)
    return {name: tensors[name] for name in sorted(buffers)}


@pytest.mark.parametrize("case", ["bias_ep2_to_ep1", "bias_bf16_ep2_same_layout"])
def test_expert_bias_resumes_at_any_layout(runs, case):
    """The bias is saved, restored exactly (fp32, also in a bf16 run) and keeps moving as in the uninterrupted run."""
    saved, resumed = runs / f"{case}_save", runs / f"{case}_resume"
    bias_saved = expert_bias(checkpoint(saved, SAVE_STEP))
    assert sorted(bias_saved) == [f"model.layers.{i}.mlp.moe.deepspeed_moe.gate.e_score_correction_bias"
                                  for i in (1, 2)]  # layer 0 is dense
    assert all(bias.dtype == torch.float32 and bias.abs().max() > 0 for bias in bias_saved.values())
    # What the resumed run's first step routed with: the checkpoint's bias, bit for bit.
    assert torch.equal(torch.load(resumed / "bias_at_start.pt"), torch.stack(list(bias_saved.values())))
    final, reference = expert_bias(checkpoint(resumed, STEPS)), expert_bias(checkpoint(saved, STEPS))
    assert all(not torch.equal(final[name], bias_saved[name]) for name in final)  # it kept moving ...
    assert all(torch.equal(final[name], reference[name]) for name in final)  # ... as in the uninterrupted run
    assert_resumed_like_uninterrupted(saved, resumed)


def test_swapped_expert_moments_are_caught(runs):
    """Negative control: with two experts' Adam moments traded (weights intact), the checks above fail."""
    expected, got = train_rows(runs / f"{SCRAMBLED}_save"), train_rows(runs / "scrambled_resume")
    # Step 4 uses the restored weights only; the moments act from its update on.
    assert got[SAVE_STEP + 1]["train/loss"] == pytest.approx(expected[SAVE_STEP + 1]["train/loss"], rel=1e-5)
    later = [abs(got[s]["train/loss"] / expected[s]["train/loss"] - 1) for s in range(SAVE_STEP + 2, STEPS + 1)]
    assert max(later) > 1e-5, later  # the loss tolerance above
    wrong = mismatches(portable_tensors(checkpoint(runs / "scrambled_resume", STEPS)),
                       portable_tensors(checkpoint(runs / f"{SCRAMBLED}_save", STEPS)))
    for expert in (0, 3):
        assert any(f"deepspeed_experts.{expert}.gate_proj.weight" in key and "/" not in key for key in wrong), wrong
