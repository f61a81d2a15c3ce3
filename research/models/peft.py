"""Parameter-efficient methods composed onto the decoder: LoRA, prompt tuning, bottleneck adapters.

Each adds its own small modules beside the base ones (`attn/q` gets `attn/q_lora`), so the base
params keep their names and shapes and `split_trainable` can tell the two apart by path alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.errors import ConfigError

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
METHODS = ("none", "lora", "prompt", "adapter")
# Names of the modules the methods add; any param under one of them trains.
TRAINABLE_MODULE_SUFFIXES = ("_lora",)
# Scalar heads (research/models/heads.py) are always fresh, so they train under every method.
TRAINABLE_NAMES = ("soft_prompt", "attn_adapter", "mlp_adapter", "score", "value_head")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  method: str = "none"
  # LoRA (PEFT's defaults and names)
  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "v")
  rslora: bool = False
  # prompt tuning
  num_virtual_tokens: int = 0
  # bottleneck adapters
  adapter_dim: int = 0
  # dtype of every parameter added on top of the base (LoRA, soft prompt, adapters, value and
  # score heads) and so of its optimizer moments: small, trained, and kept float32 over a
  # bfloat16 base so that updates far below a bfloat16 ulp are not rounded away.
  param_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.method not in METHODS:
      raise ConfigError(f"peft.method={self.method!r}; choose one of {METHODS}")
    if self.method == "lora":
      if self.r < 1:
        raise ConfigError(f"peft.r={self.r} must be a positive rank")
      unknown = sorted(set(self.targets) - set(LORA_TARGETS))
      if unknown or not self.targets:
        raise ConfigError(f"LoRA targets {list(self.targets)}: {unknown or 'none'} match no module;"
                          f" choose among {list(LORA_TARGETS)}")
      if not 0.0 <= self.dropout < 1.0:
        raise ConfigError(f"peft.dropout={self.dropout} must lie in [0, 1)")
    if self.method == "prompt" and self.num_virtual_tokens < 1:
      raise ConfigError("peft.method='prompt' needs peft.num_virtual_tokens >= 1")
    if self.method == "adapter" and self.adapter_dim < 1:
      raise ConfigError("peft.method='adapter' needs peft.adapter_dim >= 1")
    try:
      jnp.dtype(self.param_dtype)
    except TypeError as e:
      raise ConfigError(f"peft.param_dtype={self.param_dtype!r} is not a dtype") from e

  @property
  def lora_scale(self) -> float:
    return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

  def lora_on(self, name: str) -> bool:
    return self.method == "lora" and name in self.targets

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["targets"] = list(self.targets)
    return d


NO_PEFT = PeftConfig()


class LoraDelta(nn.Module):
  """x -> scale * dropout(x) @ A @ B, with B zero at init (PEFT's default), so training starts at
  the base model. A: [in..., r], B: [r, out...], flattened over multi-axis in/out features."""
  in_axes: tuple[str, ...]
  out_shape: tuple[int, ...]
  out_axes: tuple[str, ...]
  num_in_dims: int
  peft: PeftConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.peft
    in_shape = x.shape[-self.num_in_dims:]
    # Kaiming-uniform A as in PEFT (a=sqrt(5) gives bound 1/sqrt(fan_in)).
    fan_in = math.prod(in_shape)
    a_init = nn.initializers.uniform(scale=2.0 / math.sqrt(fan_in))
    a = self.param("lora_a", nn.with_logical_partitioning(
        lambda k, s, d: a_init(k, s, d) - 1.0 / math.sqrt(fan_in), self.in_axes + ("lora_rank",)),
        (*in_shape, cfg.r), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, ("lora_rank",) + self.out_axes), (cfg.r, *self.out_shape),
        self.param_dtype)
    if cfg.dropout > 0.0:
      x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = x.astype(self.dtype)
    in_letters = "ijkl"[:self.num_in_dims]
    out_letters = "mnop"[:len(self.out_shape)]
    h = jnp.einsum(f"...{in_letters},{in_letters}r->...r", x, a.astype(self.dtype))
    return cfg.lora_scale * jnp.einsum(f"...r,r{out_letters}->...{out_letters}", h,
                                       b.astype(self.dtype))


class BottleneckAdapter(nn.Module):
  """Houlsby-style adapter h + up(silu(down(h))); `up` starts at zero so the block is unchanged."""
  adapter_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_bte):
    e = h_bte.shape[-1]
    down = nn.Dense(self.adapter_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="down",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ("embed", "adapter")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("adapter",)))
    up = nn.Dense(e, dtype=self.dtype, param_dtype=self.param_dtype, name="up",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ("adapter", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    return h_bte + up(nn.silu(down(h_bte)))


def is_trainable_path(path: tuple[Any, ...]) -> bool:
  keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
  return any(isinstance(k, str) and (k.endswith(TRAINABLE_MODULE_SUFFIXES) or k in TRAINABLE_NAMES)
             for k in keys)


def cast_added(params: Any, dtype: Any) -> Any:
  """`params` with every floating parameter that a PEFT method or a head added cast to `dtype`
  (boxed or plain leaves, arrays or shapes); the base's parameters keep theirs."""
  def cast(path, x):
    if not (is_trainable_path(path) and jnp.issubdtype(x.dtype, jnp.floating)):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)


def split_trainable(params: Any, peft: PeftConfig) -> tuple[Any, Any]:
  """(trainable, frozen) nested dicts: everything trains without PEFT, only the added params with.
  Added params come in `peft.param_dtype` whatever the base's dtype."""
  params = cast_added(params, jnp.dtype(peft.param_dtype))
  if peft.method == "none":
    return params, {}
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(
      x, nn.Partitioned))[0]
  trainable: dict = {}
  frozen: dict = {}
  for path, leaf in flat:
    target = trainable if is_trainable_path(path) else frozen
    node = target
    keys = [k.key for k in path]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  if not trainable:
    raise ConfigError(f"peft.method={peft.method!r} added no trainable parameter: check its options")
  return trainable, frozen


def lora_delta(a: jax.Array, b: jax.Array, scale: float, kernel_ndim: int) -> jax.Array:
  """scale * A @ B shaped like the adapted kernel; A [L?, in..., r], B [L?, r, out...]."""
  stacked = (a.ndim - 1) + (b.ndim - 1) == kernel_ndim + 1
  product = (jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1)) if stacked
             else (lambda x, y: jnp.tensordot(x, y, axes=1)))
  return scale * product(a.astype(jnp.float32), b.astype(jnp.float32))


def merge_lora(params: Any, peft: PeftConfig) -> Any:
  """Base params with every `<name>_lora` folded into `<name>/kernel` (and the LoRA entries gone)."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key.endswith("_lora"):
      continue
    lora = params.get(f"{key}_lora")
    if lora is not None:
      kernel = value["kernel"]
      delta = lora_delta(lora["lora_a"], lora["lora_b"], peft.lora_scale, kernel.ndim)
      value = {**value, "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
    out[key] = merge_lora(value, peft)
  return out


def strip_peft(params: Any) -> Any:
  """The base decoder's params alone (drops every parameter a PEFT method or a head added)."""
  if not isinstance(params, dict):
    return params
  return {k: strip_peft(v) for k, v in params.items()
          if not (k.endswith(TRAINABLE_MODULE_SUFFIXES) or k in TRAINABLE_NAMES)}
