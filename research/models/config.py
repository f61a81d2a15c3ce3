"""The decoder's hyperparameters: one frozen dataclass shared by every stage and by the converters."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from research.errors import ConfigError
from research.models.rope import validate_rope_scaling

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_attention")
ATTENTION = ("auto", "reference", "cpu_blocked", "cudnn", "splash")  # see models/attention.py
# The Hugging Face model types this decoder matches.
HF_ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names, one per layer
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama family), GeGLU with tanh GELU (Gemma)
# Fields that say how to run a model, not what it is: a stage started from `--config.init=DIR`
# takes the architecture from DIR and these from the config's `model` section.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention", "layer_streams",
                  "loss_chunk_tokens")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder (Llama, Qwen2, Mistral, Qwen3, Gemma 2 and 3 share it; options cover
  their differences)."""

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
  # Scaled RoPE as transformers computes it: None (plain), or the (key, value) pairs of the HF
  # `rope_scaling` dict, `rope_type` first among them ('linear', 'dynamic', 'yarn', 'llama3').
  # A tuple so the config stays hashable (it is a static argument of compiled functions).
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  # Rope base of the sliding-window layers when it differs from `rope_theta` (Gemma 3's
  # `rope_local_base_freq`); those layers then use plain RoPE, the full layers `rope_scaling`.
  rope_local_theta: float | None = None
  # Sliding-window attention: a query sees itself and the `sliding_window - 1` keys before it
  # (transformers' convention) on the layers `layer_types` marks 'sliding_attention'; None: full.
  # `layer_types` None with a window set means every layer slides (Mistral).
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  # Per-head RMSNorm over head_dim on q and k before the rotation (Qwen3, Gemma 3).
  qk_norm: bool = False
  # Gemma: RMSNorm scales by (norm_offset + weight); GeGLU; embeddings times sqrt(hidden_size);
  # norms on the attention and MLP outputs before each residual; attention scale
  # query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5); tanh soft-capping of attention
  # scores and of the final logits (cap * tanh(x / cap); None: off).
  norm_offset: float = 0.0
  mlp_activation: str = "silu"
  embed_scale: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
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
    # JSON (model_config.json) gives lists; the config keeps tuples so it stays hashable.
    if isinstance(self.layer_types, list):
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if self.rope_scaling is not None:
      items = self.rope_scaling.items() if isinstance(self.rope_scaling, Mapping) else self.rope_scaling
      # One order (rope_type first, then by key): equal scalings give equal, equally hashed configs.
      try:
        pairs = sorted(((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items),
                       key=lambda kv: (kv[0] != "rope_type", kv[0]))
      except (TypeError, ValueError) as e:
        raise ConfigError(f"model.rope_scaling must be a dict of rope parameters (or None), got "
                          f"{self.rope_scaling!r}") from e
      object.__setattr__(self, "rope_scaling", tuple(pairs))
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
    if not isinstance(self.norm_offset, (int, float)) or isinstance(self.norm_offset, bool):
      raise ConfigError(f"model.norm_offset must be a number (0.0, or 1.0 for Gemma), got "
                        f"{self.norm_offset!r}")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ConfigError(f"model.mlp_activation={self.mlp_activation!r}; choose one of "
                        f"{MLP_ACTIVATIONS}")
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                            or self.sliding_window <= 0):
      raise ConfigError(f"model.sliding_window must be a positive integer or None, got "
                        f"{self.sliding_window!r}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ConfigError(f"model.layer_types has {len(self.layer_types)} entries for "
                          f"model.num_layers={self.num_layers}; give one per layer")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise ConfigError(f"model.layer_types holds {bad}; each entry is one of {LAYER_TYPES}")
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        raise ConfigError("model.layer_types marks sliding_attention layers but "
                          "model.sliding_window is None; set the window")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar",
                 "rope_local_theta"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"model.{name} must be a positive number or None, got {value!r}")
    validate_rope_scaling(None if self.rope_scaling is None else dict(self.rope_scaling))
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

  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends through the sliding window."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    if self.layer_types is None:
      return (True,) * self.num_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

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
    norms = (4 if self.post_norms else 2) * h + (2 * hd if self.qk_norm else 0)
    per_layer = attn + mlp + norms
    head = 0 if self.tie_embeddings else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * per_layer + h + head
