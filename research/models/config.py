"""The decoder's hyperparameters: one frozen dataclass shared by every stage and by the converters."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from research.errors import ConfigError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_attention")
ATTENTION = ("auto", "reference", "cpu_blocked", "cudnn", "splash")  # see models/attention.py
HF_ARCHITECTURES = ("llama", "qwen2", "mistral")  # the Hugging Face model types this decoder matches
# Fields that say how to run a model, not what it is: a stage started from `--config.init=DIR`
# takes the architecture from DIR and these from the config's `model` section.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention", "layer_streams",
                  "loss_chunk_tokens")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder (Llama, Qwen2, Mistral share it; options cover their differences)."""

  vocab_size: int = 8192
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int | None = None  # None: hidden_size // num_heads
  mlp_dim: int = 688
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  attention_bias: bool = False  # Qwen2 has biases on q, k, v
  tie_embeddings: bool = False
  max_position_embeddings: int = 2048  # recorded for export; RoPE itself has no table
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = True
  # What the backward pass recomputes instead of keeping. 'dots_attention' keeps the projections'
  # outputs, the rotated q/k and attention's output and row statistics, and recomputes norms and
  # SwiGLU: elementwise recompute is cheaper than the residuals' memory traffic.
  remat_policy: str = "dots_attention"
  # Training losses run the LM head over about this many tokens per device at a time (0: all at
  # once), so the [tokens, vocab] logits and their gradient are never whole in memory; see
  # objectives.lm.chunked_head_nll_sum (docs/performance.md has the trade-off measured).
  loss_chunk_tokens: int = 1024
  # Which attention runs (research/models/attention.py): 'auto' picks the backend's kernel when the
  # model is traced (cuDNN flash attention on GPU, Pallas splash attention on TPU, the CPU path's
  # blocked kernel on CPU); 'reference' is the plain product; 'cpu_blocked', 'cudnn', 'splash' name
  # one. 'cpu_blocked' also turns on the rest of the CPU path (research/models/cpu_kernels.py).
  attention: str = "auto"
  # Each layer runs on this many independent slices of the batch's rows (each batch shard's rows
  # split evenly; 1 when they do not divide, and for cached decoding). Same math, row for row; the
  # slices' products and elementwise passes do not depend on each other, so a runtime can run them
  # side by side. 0 picks by the attention resolved: 2 on the CPU path, where XLA:CPU runs most of
  # a layer's operations on one thread each; 1 elsewhere, as accelerators run one operation at a
  # time on all their cores and 1 keeps the products at full height. Each stream traces the layer
  # body again (a longer compile).
  layer_streams: int = 0
  # Token ids recorded for export and generation (None when unknown).
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  # The Hugging Face model type this config was imported from; export writes it back by default.
  hf_architecture: str | None = None

  def __post_init__(self):
    self.validate()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim else self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def validate(self) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ConfigError(
          f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
          f"{self.num_heads}; set model.head_dim explicitly")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary embeddings")
    if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0:
      raise ConfigError(f"model.loss_chunk_tokens must be an integer >= 0 (0: no chunking), got "
                        f"{self.loss_chunk_tokens!r}")
    if not isinstance(self.layer_streams, int) or self.layer_streams < 0:
      raise ConfigError(f"model.layer_streams must be an integer >= 0 (0: by the attention in use), got "
                        f"{self.layer_streams!r}")
    if self.attention not in ATTENTION:
      raise ConfigError(f"model.attention={self.attention!r}; choose one of {ATTENTION}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"model.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
    if self.hf_architecture is not None and self.hf_architecture not in HF_ARCHITECTURES:
      raise ConfigError(f"model.hf_architecture={self.hf_architecture!r}; choose one of "
                        f"{HF_ARCHITECTURES} or None")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} is not a dtype") from e

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ConfigError(f"unknown model config keys {unknown}; known: {sorted(fields)}")
    return cls(**dict(d))

  def num_params(self) -> int:
    """Parameter count computed from shapes (embeddings included)."""
    h, hd = self.hidden_size, self.resolved_head_dim
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
    mlp = 3 * h * self.mlp_dim
    per_layer = attn + mlp + 2 * h
    head = 0 if self.tie_embeddings else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * per_layer + h + head
