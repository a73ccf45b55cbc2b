"""Checkpoint checks that need no engine: what the manifest's model must agree on with the run's."""

import json
import warnings

import pytest

from moe_model import MoeConfig
from moe_recipe.checkpoint import check_model_matches


def manifest_of(config: MoeConfig) -> dict:
    return {"model": json.loads(config.to_json_string(use_diff=False))}


def test_the_expert_bias_cannot_be_switched_on_or_off_between_jobs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # router_aux_loss_coef without a loss
        with_bias = MoeConfig(router_balance="bias")
    without_bias = MoeConfig(router_balance="aux")
    check_model_matches(manifest_of(without_bias), MoeConfig(router_balance="global"), tmp_path)  # a loss may change
    check_model_matches(manifest_of(with_bias), MoeConfig(router_balance="bias+sequence"), tmp_path)
    with pytest.raises(ValueError, match=r"model.router.balance='aux' there, 'bias' here \(with and without"):
        check_model_matches(manifest_of(without_bias), with_bias, tmp_path)
    with pytest.raises(ValueError, match=r"model.router.balance='bias' there, 'aux' here"):
        check_model_matches(manifest_of(with_bias), without_bias, tmp_path)
    old = manifest_of(without_bias)
    del old["model"]["router_balance"]  # saved before the setting existed: DeepSpeed's aux loss, no bias
    check_model_matches(old, without_bias, tmp_path)
