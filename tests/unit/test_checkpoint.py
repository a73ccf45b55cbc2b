"""Checkpoint checks that need no engine: what the manifest's model must agree on with the run's; resume reads a
manifest once."""

import json
import logging
import warnings

import pytest

from moe_model import MoeConfig
from moe_recipe import checkpoint
from moe_recipe.checkpoint import (FORMAT, MANIFEST, ResumePoint, _warn_changed_settings, check_layout_matches,
                                   check_model_matches, check_resume, planned_layout)
from tests.helpers import compose_recipe


def manifest_of(config: MoeConfig) -> dict:
    return {"model": json.loads(config.to_json_string(use_diff=False))}


def test_the_expert_bias_cannot_be_switched_on_or_off_between_jobs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # router_aux_loss_coef without a loss
        with_bias = MoeConfig(router_balance="none", router_expert_bias=True)
    without_bias = MoeConfig(router_balance="aux")
    check_model_matches(manifest_of(without_bias), MoeConfig(router_balance="global"), tmp_path)  # a loss may change
    check_model_matches(manifest_of(with_bias), MoeConfig(router_balance="sequence", router_expert_bias=True),
                        tmp_path)
    with pytest.raises(ValueError, match=r"model.router.expert_bias=False there, True here"):
        check_model_matches(manifest_of(without_bias), with_bias, tmp_path)
    with pytest.raises(ValueError, match=r"model.router.expert_bias=True there, False here"):
        check_model_matches(manifest_of(with_bias), without_bias, tmp_path)
    old = manifest_of(without_bias)
    del old["model"]["router_balance"], old["model"]["router_expert_bias"]  # saved before either setting existed
    check_model_matches(old, without_bias, tmp_path)


def write_checkpoint(folder, config: MoeConfig, step: int) -> None:
    """A manifest and the one file it lists: what resume checks, without an engine's state."""
    folder.mkdir(parents=True)
    (folder / "rng_rank00000.bin").write_bytes(b"1234")
    manifest = {"format": FORMAT, "step": step, "scheduler": {"last_epoch": step}, "files": {"rng_rank00000.bin": 4},
                **manifest_of(config)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_resume_reads_the_manifest_once_and_hands_it_on(tmp_path, monkeypatch):
    config = MoeConfig()
    for step in (1, 2):
        write_checkpoint(tmp_path / f"step_{step:08d}", config, step)
    reads = []
    read_manifest = checkpoint.read_manifest
    monkeypatch.setattr(checkpoint, "read_manifest", lambda folder: reads.append(folder) or read_manifest(folder))
    resume = check_resume("auto", tmp_path, config)
    assert reads == [tmp_path / "step_00000002"]
    assert isinstance(resume, ResumePoint) and resume.path == tmp_path / "step_00000002" and resume.step == 2
    assert resume.manifest["files"] == {"rng_rank00000.bin": 4}
    assert check_resume("none", tmp_path / "elsewhere", config) is None


def test_a_checkpoint_without_portable_state_resumes_at_its_own_layout_only(tmp_path):
    """autoep (or ZeRO-3) saves no layout-independent state: another layout is refused before any engine exists."""
    cfg = compose_recipe("model.moe_backend=autoep", "model.drop_tokens=false", "parallel.ep_size=2")
    saved = planned_layout(cfg, world_size=2)
    assert saved == {"world_size": 2, "ep_size": 2, "zero_stage": 0, "offload_optimizer": False, "dtype": "float32"}
    manifest = {"model": {"moe_backend": "autoep"}, "layout": saved, "tensors": None}
    check_layout_matches(manifest, planned_layout(cfg, world_size=2), tmp_path)
    cfg.parallel.ep_size = 1
    with pytest.raises(ValueError, match=r"saved at 2 ranks, parallel.ep_size=2 and holds no layout-independent state "
                                         r"\(model.moe_backend='autoep'.*this run has 1 rank, parallel.ep_size=1\."):
        check_layout_matches(manifest, planned_layout(cfg, world_size=1), tmp_path)
    check_layout_matches({**manifest, "tensors": {}}, planned_layout(cfg, world_size=1), tmp_path)  # portable


@pytest.mark.parametrize("old_balance, balance", [("bias", "none"), ("bias+aux", "aux"), ("bias+global", "global"),
                                                  ("bias+sequence", "sequence")])
def test_a_manifest_with_the_bias_spelled_in_router_balance_resumes_as_the_same_model(tmp_path, caplog, old_balance,
                                                                                       balance):
    """Checkpoints written before router_expert_bias existed: router_balance 'bias+sequence', eval_capacity_factor.
    The run that resumes them spells it balance=sequence expert_bias=true: the same model, and no changed setting."""
    config = MoeConfig(router_balance=balance, router_expert_bias=True, router_aux_loss_coef=0.0)
    old = manifest_of(config)
    del old["model"]["router_expert_bias"]
    old["model"].update(router_balance=old_balance, eval_capacity_factor=1.0)
    check_model_matches(old, config, tmp_path)
    with caplog.at_level(logging.WARNING, logger="moe_recipe.checkpoint"):
        _warn_changed_settings(old, config, tmp_path)
        assert caplog.text == ""
        changed = MoeConfig(router_balance=balance, router_expert_bias=True, router_aux_loss_coef=0.0,
                            router_bias_update_rate=0.01)
        _warn_changed_settings(old, changed, tmp_path)
    assert "changed model settings: router_bias_update_rate 0.001 -> 0.01" in caplog.text
    with pytest.raises(ValueError, match=r"model.router.expert_bias=True there, False here"):
        check_model_matches(old, MoeConfig(router_balance=balance, router_aux_loss_coef=0.0), tmp_path)
