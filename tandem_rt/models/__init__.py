"""Plain-PyTorch reference models: the numerical ground truth and what training uses."""
from tandem_rt.models.llama import LlamaForCausalLM, RMSNorm, rope_cos_sin, apply_rope
from tandem_rt.models.router import Router, router_features
from tandem_rt.models.tandem import TandemModel, TandemOutput, training_boundary

__all__ = ["LlamaForCausalLM", "RMSNorm", "rope_cos_sin", "apply_rope", "Router", "router_features",
           "TandemModel", "TandemOutput", "training_boundary"]
