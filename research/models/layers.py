"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, the gated MLP
(SwiGLU or Gemma's GeGLU), the block.

Shapes use one convention throughout: B batch, T query time, S key time, E embed, H heads,
K kv heads, D head dim, F mlp, V vocab. Every parameter carries logical axis names.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from research.models import cpu_kernels
from research.models.attention import FUSED, MaskInfo, attention, resolve, uses_cpu_kernels
from research.models.config import ModelConfig
from research.models.peft import NO_PEFT, BottleneckAdapter, LoraDelta, PeftConfig
from research.models.rope import rotary_tables  # noqa: F401  (the decoder's, re-exported)
from research.parallel import activations as act

Initializer = Callable[..., jax.Array]


def param_init(config: ModelConfig) -> Initializer:
  del config
  return nn.initializers.normal(stddev=0.02)


def logical(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
  return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, then a scale by `offset + scale`; `scale` starts where that
  product is 1 (ones for Llama, zeros for Gemma's offset 1), and equals the HF weight as stored.
  `axis_name` is the logical name of that axis (the per-head q/k norms normalise over
  'head_dim')."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"
  offset: float = 0.0

  @nn.compact
  def __call__(self, x_bte: jax.Array) -> jax.Array:
    init = nn.initializers.constant(1.0 - self.offset)
    scale_e = self.param("scale", logical(init, (self.axis_name,)), (x_bte.shape[-1],),
                         self.param_dtype)
    x32 = x_bte.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Whole on every device (FSDP shards it over `embed`): scaling a batch-sharded activation by
    # an embed-sharded vector would make XLA reshard the activation instead.
    scale_e = act.constrain(scale_e, act.WHOLE_VECTOR)
    if self.offset:
      # As transformers' Gemma does: scale by (offset + weight) in float32, then cast.
      return (normed * (self.offset + scale_e.astype(jnp.float32))).astype(self.dtype)
    # As transformers' Llama does: normalise in float32, cast back, then scale.
    return scale_e.astype(self.dtype) * normed.astype(self.dtype)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, whose backward keeps only `gate` and `up` (autodiff keeps five arrays of
  that size: gate, up and three pieces of silu)."""
  return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(res, g):
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  return g * up * (sig * (1 + gate * (1 - sig))), g * (gate * sig)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)

_GELU_C = 0.7978845608028654  # sqrt(2 / pi), the tanh GELU's constant


@jax.custom_vjp
def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """gelu_tanh(gate) * up (transformers' `gelu_pytorch_tanh`), whose backward keeps only `gate`
  and `up`, as `swiglu`'s does."""
  return nn.gelu(gate, approximate=True) * up


def _geglu_fwd(gate, up):
  return geglu(gate, up), (gate, up)


def _geglu_bwd(res, g):
  gate, up = res
  # gelu_tanh(x) = x / 2 * (1 + t), t = tanh(c (x + 0.044715 x^3)).
  t = jnp.tanh(_GELU_C * (gate + 0.044715 * gate * gate * gate))
  slope = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * gate * gate)
  return g * up * slope, g * (0.5 * gate * (1 + t))


geglu.defvjp(_geglu_fwd, _geglu_bwd)
GATED_ACTIVATIONS = {"silu": swiglu, "gelu_tanh": geglu}  # by ModelConfig.mlp_activation


def layer_rope(cfg: ModelConfig, rope, sliding):
  """One layer's (cos, sin). With `cfg.rope_local_theta` the decoder passes both tables,
  ((cos, sin) of the full layers, (cos, sin) of the sliding ones), and `sliding` (a Python bool
  or a traced bool scalar) picks; otherwise `rope` is the one (cos, sin)."""
  if cfg.rope_local_theta is None:
    return rope
  full, local = rope
  if isinstance(sliding, bool):
    return local if sliding else full
  return tuple(jnp.where(sliding, l, f) for l, f in zip(local, full))


def apply_rotary(x_bthd: jax.Array, cos_bt1d: jax.Array, sin_bt1d: jax.Array) -> jax.Array:
  x32 = x_bthd.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos_bt1d + rotated * sin_bt1d).astype(x_bthd.dtype)


class KVCache(NamedTuple):
  """One layer's cache slice as the attention sees it (stacked over layers in the decoder)."""
  k_bskd: jax.Array
  v_bskd: jax.Array
  index: jax.Array  # int32 []: slot of the first current token


def _with_lora(base: nn.Module, x, peft: PeftConfig, name: str, in_axes, out_axes, out_shape,
               num_in_dims: int, cfg: ModelConfig, deterministic: bool):
  def layer(x_n):
    y = base(x_n)
    if peft.lora_on(name):
      y = y + LoraDelta(in_axes, out_shape, out_axes, num_in_dims, peft, cfg.compute_dtype,
                        cfg.weight_dtype, name=f"{name}_lora")(x_n, deterministic)
    return y
  if uses_cpu_kernels(cfg.attention):  # [tokens, in...], see cpu_kernels.apply_flat
    return cpu_kernels.apply_flat(layer, x, num_in_dims)
  return layer(x)


class Attention(nn.Module):
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True

  def _proj(self, x_bte, heads: int, head_axis: str, name: str):
    # On the CPU path the weight gradient comes from a row-major x^T (`xt_dot_general`): XLA:CPU
    # otherwise transposes each of q/k/v's gradients to [heads * head_dim, tokens], in a fusion
    # with the rotary and head-major backward that runs far below copy speed. The o and MLP
    # projections gain nothing from it.
    cfg = self.config
    cpu = uses_cpu_kernels(cfg.attention)
    base = nn.DenseGeneral(
        features=(heads, cfg.resolved_head_dim), axis=-1, use_bias=cfg.attention_bias,
        dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name,
        dot_general=cpu_kernels.xt_dot_general if cpu else jax.lax.dot_general,
        kernel_init=logical(param_init(cfg), ("embed", head_axis, "head_dim")),
        bias_init=logical(nn.initializers.zeros, (head_axis, "head_dim")))
    return _with_lora(base, x_bte, self.peft, name, ("embed",), (head_axis, "head_dim"),
                      (heads, cfg.resolved_head_dim), 1, cfg, self.deterministic)

  @nn.compact
  def __call__(self, x_bte, mask_info: MaskInfo, rope, cache: KVCache | None = None,
               sliding=False):
    """`mask_info` from `attention.make_mask_info`, `rope` = `rotary_tables(...)` (see
    `layer_rope`): both built once by the decoder for all layers. With `cache`, the keys are the
    cache's slots. `sliding`: this layer attends through `cfg.sliding_window` (a Python bool, or
    a traced bool scalar under `nn.scan`)."""
    cfg = self.config
    q_bthd = act.constrain(self._proj(x_bte, cfg.num_heads, "heads", "q"), act.QUERY_HEADS)
    k_btkd = act.constrain(self._proj(x_bte, cfg.num_kv_heads, "kv_heads", "k"), act.KV_HEADS)
    v_btkd = act.constrain(self._proj(x_bte, cfg.num_kv_heads, "kv_heads", "v"), act.KV_HEADS)
    if cfg.qk_norm:  # per head, over head_dim, before the rotation (Qwen3, Gemma 3)
      norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                  axis_name="head_dim", offset=cfg.norm_offset)
      q_bthd = RMSNorm(**norm, name="q_norm")(q_bthd)
      k_btkd = RMSNorm(**norm, name="k_norm")(k_btkd)
    rope = layer_rope(cfg, rope, sliding)
    # Named for remat policies that keep them (see decoder._REMAT_POLICIES' 'dots_attention').
    q_bthd = checkpoint_name(apply_rotary(q_bthd, *rope), "rotary")
    k_btkd = checkpoint_name(apply_rotary(k_btkd, *rope), "rotary")
    new_cache = None
    if cache is not None:  # this step's keys and values into their slots; attend over every slot
      k_btkd = jax.lax.dynamic_update_slice(cache.k_bskd, k_btkd.astype(cache.k_bskd.dtype),
                                            (0, cache.index, 0, 0))
      v_btkd = jax.lax.dynamic_update_slice(cache.v_bskd, v_btkd.astype(cache.v_bskd.dtype),
                                            (0, cache.index, 0, 0))
      new_cache = (k_btkd, v_btkd)
    impl = cfg.attention
    if self.is_initializing() and resolve(impl, softcap=cfg.attn_logit_softcap) in FUSED:
      # The params do not depend on the kernel, and init traces dummy shapes (a few tokens) that
      # the fused kernels' blocks may not divide.
      impl = "reference"
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    out_bthd = attention(q_bthd.astype(cfg.compute_dtype), k_btkd.astype(cfg.compute_dtype),
                         v_btkd.astype(cfg.compute_dtype), mask_info, impl, scale=scale,
                         softcap=cfg.attn_logit_softcap, window=cfg.sliding_window,
                         sliding=sliding)
    base = nn.DenseGeneral(
        features=cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype, name="o",
        kernel_init=logical(param_init(cfg), ("heads", "head_dim", "embed")))
    out_bte = _with_lora(base, out_bthd, self.peft, "o", ("heads", "head_dim"), ("embed",),
                         (cfg.hidden_size,), 2, cfg, self.deterministic)
    return out_bte, new_cache


class MLP(nn.Module):
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_bte):
    cfg = self.config

    def dense(x, features, axes, name):
      base = nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype,
                      param_dtype=cfg.weight_dtype, name=name,
                      kernel_init=logical(param_init(cfg), axes))
      return _with_lora(base, x, self.peft, name, axes[:1], axes[1:], (features,), 1, cfg,
                        self.deterministic)

    gate_btf = act.constrain(dense(x_bte, cfg.mlp_dim, ("embed", "mlp"), "gate"), act.MLP_HIDDEN)
    up_btf = act.constrain(dense(x_bte, cfg.mlp_dim, ("embed", "mlp"), "up"), act.MLP_HIDDEN)
    gated_btf = GATED_ACTIVATIONS[cfg.mlp_activation](gate_btf, up_btf)
    return dense(gated_btf, cfg.hidden_size, ("mlp", "embed"), "down")


class DecoderBlock(nn.Module):
  """Pre-norm block: norm, attention, residual, norm, MLP, residual; with `post_norms` (Gemma)
  each sublayer's output is normed again before its residual add. Returns (x, this layer's new
  KV cache or None): the body of `nn.scan`. `layer_kv` is this layer's (k, v) cache slice, written
  at `mask_info.q_offset`.

  Param names: attn_norm (HF input_layernorm), mlp_norm (the pre-MLP norm: Llama's
  post_attention_layernorm, Gemma's pre_feedforward_layernorm), and with `post_norms`
  attn_post_norm (Gemma's post_attention_layernorm) and mlp_post_norm
  (post_feedforward_layernorm).

  Whether the layer slides (`cfg.sliding_layers()`): `layer_sliding` when the block is one
  unrolled layer; else the call's `sliding`, a bool scalar scanned over the layers when they
  differ; else (both None) every layer is the same and the config says which, statically.
  """
  config: ModelConfig
  peft: PeftConfig = NO_PEFT
  deterministic: bool = True
  layer_sliding: bool | None = None

  def setup(self):
    cfg, peft = self.config, self.peft
    norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                offset=cfg.norm_offset)
    self.attn_norm = RMSNorm(**norm)
    self.attn = Attention(cfg, peft, self.deterministic)
    self.mlp_norm = RMSNorm(**norm)
    self.mlp = MLP(cfg, peft, self.deterministic)
    if cfg.post_norms:
      self.attn_post_norm = RMSNorm(**norm)
      self.mlp_post_norm = RMSNorm(**norm)
    if peft.method == "adapter":
      self.attn_adapter = BottleneckAdapter(peft.adapter_dim, cfg.compute_dtype, cfg.weight_dtype)
      self.mlp_adapter = BottleneckAdapter(peft.adapter_dim, cfg.compute_dtype, cfg.weight_dtype)

  def __call__(self, x_bte, mask_info: MaskInfo, rope, layer_kv=None, sliding=None):
    adapters = self.peft.method == "adapter"
    cache = None if layer_kv is None else KVCache(*layer_kv, mask_info.q_offset)
    if self.layer_sliding is not None:
      sliding = self.layer_sliding
    elif sliding is None:
      sliding = self.config.sliding_layers()[0]
    post_norms = self.config.post_norms
    h_bte, new_kv = self.attn(self.attn_norm(x_bte), mask_info, rope, cache, sliding)
    if adapters:  # on the sublayer's output, before any post-norm (Houlsby's placement)
      h_bte = self.attn_adapter(h_bte)
    if post_norms:
      h_bte = self.attn_post_norm(h_bte)
    x_bte = x_bte + h_bte
    h_bte = self.mlp(self.mlp_norm(x_bte))
    if adapters:
      h_bte = self.mlp_adapter(h_bte)
    if post_norms:
      h_bte = self.mlp_post_norm(h_bte)
    return act.constrain(x_bte + h_bte, act.RESIDUAL), new_kv
