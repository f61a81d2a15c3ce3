"""Model sections of real-size decoders (Llama 3, Gemma 3, Qwen3), shared by the configs/plan_*.py
configs."""

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


def gemma3_4b(**overrides) -> ConfigDict:
  """Gemma-3-4B's text decoder: five sliding-window layers (1024 tokens, rope base 1e4) to one
  global layer (rope base 1e6, linear scaling by 8), q/k norms, Gemma's block, tied embeddings."""
  layers = 34
  return common.model_config(
      vocab_size=262208, hidden_size=2560, num_layers=layers, num_heads=8, num_kv_heads=4,
      head_dim=256, mlp_dim=10240, rms_norm_eps=1e-6, max_position_embeddings=131072,
      rope_theta=1_000_000.0, rope_scaling=(("rope_type", "linear"), ("factor", 8.0)),
      rope_local_theta=10_000.0, sliding_window=1024,
      layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(layers)),
      qk_norm=True, norm_offset=1.0, mlp_activation="gelu_tanh", embed_scale=True,
      post_norms=True, query_pre_attn_scalar=256.0, tie_embeddings=True, dtype="bfloat16",
      scan_layers=True, hf_architecture="gemma3_text", **overrides)


def qwen3_8b(**overrides) -> ConfigDict:
  """Qwen3-8B: q/k norms, rope base 1e6, untied embeddings; head_dim 128 = hidden / heads."""
  return common.model_config(
      vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
      mlp_dim=12288, rms_norm_eps=1e-6, max_position_embeddings=40960,
      rope_theta=1_000_000.0, qk_norm=True, tie_embeddings=False, dtype="bfloat16",
      scan_layers=True, hf_architecture="qwen3", **overrides)


def plan_section(devices: int, accelerator: str) -> ConfigDict:
  """What scripts/plan.py reads: the device count to compile for and the default accelerator."""
  return ConfigDict(dict(devices=devices, accelerator=accelerator))
