"""MoE causal LM with DeepSpeed MoE layers, registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_moe import MoeConfig
from .modeling_moe import MoeForCausalLM, MoeModel

AutoConfig.register(MoeConfig.model_type, MoeConfig)
AutoModel.register(MoeConfig, MoeModel)
AutoModelForCausalLM.register(MoeConfig, MoeForCausalLM)

__all__ = ["MoeConfig", "MoeForCausalLM", "MoeModel"]
