"""MoE causal LM with DeepSpeed MoE layers, registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_moe import MOE_BACKENDS, MoeBackend, MoeConfig
from .modeling_moe import MoeForCausalLM, MoeModel

AutoConfig.register(MoeConfig.model_type, MoeConfig)
AutoModel.register(MoeConfig, MoeModel)
AutoModelForCausalLM.register(MoeConfig, MoeForCausalLM)

__all__ = ["MOE_BACKENDS", "MoeBackend", "MoeConfig", "MoeForCausalLM", "MoeModel"]
