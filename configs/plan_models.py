"""Model sections of real-size Llama-3 family decoders, shared by the configs/plan_*.py configs."""

from ml_collections import ConfigDict

from configs import common

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
               max_position_embeddings=8192, dtype="bfloat16", scan_layers=True,
               hf_architecture="llama")


def llama3_8b(**overrides) -> ConfigDict:
  return common.model_config(**_LLAMA3, hidden_size=4096, num_layers=32, num_heads=32,
                             num_kv_heads=8, mlp_dim=14336, **overrides)


def llama3_70b(**overrides) -> ConfigDict:
  return common.model_config(**_LLAMA3, hidden_size=8192, num_layers=80, num_heads=64,
                             num_kv_heads=8, mlp_dim=28672, **overrides)


def llama32_1b(**overrides) -> ConfigDict:
  """Llama-3.2-1B's shape (tied embeddings, head_dim 64)."""
  return common.model_config(**{**_LLAMA3, "max_position_embeddings": 131072}, hidden_size=2048,
                             num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                             mlp_dim=8192, tie_embeddings=True, **overrides)


def plan_section(devices: int, accelerator: str) -> ConfigDict:
  """What scripts/plan.py reads: the device count to compile for and the default accelerator."""
  return ConfigDict(dict(devices=devices, accelerator=accelerator))
