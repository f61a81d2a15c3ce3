"""An HF `config.json`'s rope settings <-> ModelConfig's rope_theta, rope_scaling, rope_local_theta.

Transformers 4.x writes a top-level `rope_theta` and a `rope_scaling` dict (or null); 5.x writes
`rope_parameters` (`rope_type`, `rope_theta`, the scaling keys), nested by layer type where the
layer types differ (Gemma 3: `{"full_attention": {...}, "sliding_attention": {...}}`; 4.x Gemma 3
has `rope_scaling` for the full layers and `rope_local_base_freq` for the sliding ones). Reading
follows transformers 5: a non-empty `rope_scaling` wins over `rope_parameters`, and a dict's own
`rope_theta` over the top-level one. Export writes both spellings, so either version reads the
same rope, and import(export(cfg)) gives cfg back exactly.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from research.errors import ConfigError
from research.models.rope import ROPE_TYPES, UNSUPPORTED_TYPES, validate_rope_scaling

log = logging.getLogger(__name__)

_LAYER_TYPE_KEYS = ("full_attention", "sliding_attention")
# Rope bases transformers' config classes fall back to when config.json states none.
_DEFAULT_THETA = {"gemma3_text": 1_000_000.0}
_DEFAULT_LOCAL_THETA = {"gemma3_text": 10_000.0}
# Model types whose sliding layers have their own rope base (`rope_local_base_freq` in 4.x).
LOCAL_THETA_ARCHITECTURES = ("gemma3_text",)


def _rope_type(rope: Mapping[str, Any]) -> str:
  return rope.get("rope_type", rope.get("type")) or "default"


def _scaling_from_hf(rope: Mapping[str, Any], where: str, max_positions: int
                     ) -> dict[str, Any] | None:
  """ModelConfig's rope_scaling dict from one HF rope dict (None for plain RoPE), with the
  defaults transformers fills in made explicit."""
  rope_type = _rope_type(rope)
  partial = rope.get("partial_rotary_factor")
  if partial is not None and partial != 1.0:
    raise ConfigError(f"HF config {where}.partial_rotary_factor={partial!r}: this decoder rotates "
                      f"whole heads only")
  if rope_type == "default":
    return None
  if rope_type not in ROPE_TYPES:
    why = ("transformers has it, this decoder does not" if rope_type in UNSUPPORTED_TYPES
           else "unknown to transformers too")
    raise ConfigError(f"HF config {where}.rope_type={rope_type!r} is not supported ({why}); "
                      f"supported: default, {', '.join(sorted(ROPE_TYPES))}")
  required, optional = ROPE_TYPES[rope_type]
  out: dict[str, Any] = {"rope_type": rope_type}
  for key in required + optional:
    if rope.get(key) is not None:
      out[key] = rope[key]
  if rope_type in ("llama3", "yarn"):
    # transformers' standardize_rope_params: the pre-training length defaults to the model's.
    out.setdefault("original_max_position_embeddings", max_positions)
    value = out["original_max_position_embeddings"]
    if isinstance(value, float) and value.is_integer():
      out["original_max_position_embeddings"] = int(value)
  if rope_type == "yarn":
    if out.get("factor") is None:  # transformers derives it from the two lengths
      out["factor"] = max_positions / out["original_max_position_embeddings"]
    if "truncate" in rope and rope["truncate"] is None:
      out["truncate"] = False  # transformers tests `if truncate:` on the value read
  ignored = sorted(set(rope) - set(out) - {"type", "rope_type", "rope_theta", "truncate",
                                           "partial_rotary_factor"})
  if ignored:
    log.warning("HF config %s has keys %s that transformers does not use for rope_type=%r; "
                "ignored", where, ignored, rope_type)
  validate_rope_scaling(out, field=f"HF config {where}")
  return out


def _global_rope(d: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
  """(the key it was read from, the rope dict transformers 5 would use), or (key, None)."""
  for key in ("rope_scaling", "rope_parameters"):  # transformers 5: rope_scaling or rope_parameters
    rope = d.get(key)
    if rope is None or rope == {}:
      continue
    if not isinstance(rope, Mapping):
      raise ConfigError(f"HF config field {key!r} must be a dict or null, got {rope!r}")
    return key, rope
  return "rope_parameters", None


def rope_fields_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
  """`rope_theta`, `rope_scaling` (the full-attention layers') and `rope_local_theta` (the sliding
  layers' base when they have their own, plain RoPE; None otherwise) for ModelConfig."""
  model_type = d.get("model_type")
  max_positions = int(d.get("max_position_embeddings") or 2048)
  if d.get("partial_rotary_factor") not in (None, 1.0):
    raise ConfigError(f"HF config partial_rotary_factor={d['partial_rotary_factor']!r}: this "
                      f"decoder rotates whole heads only")
  theta = d.get("rope_theta")
  theta = float(theta) if theta is not None else _DEFAULT_THETA.get(model_type, 10000.0)
  local_theta = d.get("rope_local_base_freq")
  key, rope = _global_rope(d)
  nested = d.get("rope_parameters")
  nested = nested if isinstance(nested, Mapping) and any(
      k in _LAYER_TYPE_KEYS for k in nested) else None
  full, sliding, where = rope, None, key
  if nested is not None:
    full, sliding, where = nested.get("full_attention"), nested.get("sliding_attention"), (
        "rope_parameters.full_attention")
    flat = d.get("rope_scaling")
    if isinstance(flat, Mapping) and flat:  # Gemma 3's config class updates the full layers with it
      full, where = {**(full or {}), **flat}, "rope_scaling"
  elif rope is not None and any(isinstance(v, Mapping) for v in rope.values()):
    raise ConfigError(f"HF config field {key!r} is nested by {sorted(rope)}; only "
                      f"{list(_LAYER_TYPE_KEYS)} are known layer types")
  if full is not None and full.get("rope_theta") is not None:
    theta = float(full["rope_theta"])
  scaling = None if full is None else _scaling_from_hf(full, where, max_positions)
  if sliding is not None:
    if _scaling_from_hf(sliding, "rope_parameters.sliding_attention", max_positions) is not None:
      raise ConfigError(f"HF config rope_parameters.sliding_attention.rope_type="
                        f"{_rope_type(sliding)!r}: sliding layers take plain RoPE only here")
    if sliding.get("rope_theta") is not None:
      local_theta = sliding["rope_theta"]
  if local_theta is None:
    local_theta = _DEFAULT_LOCAL_THETA.get(model_type)
  local_theta = None if local_theta is None or float(local_theta) == theta else float(local_theta)
  return {"rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": local_theta}


def rope_fields_to_hf(cfg: Any, architecture: str) -> dict[str, Any]:
  """The rope entries of an exported `config.json`, in both the 4.x and the 5.x spelling."""
  theta = cfg.rope_theta
  scaling = None if cfg.rope_scaling is None else dict(cfg.rope_scaling)
  full = {"rope_type": "default", "rope_theta": theta} if scaling is None else {
      **scaling, "rope_theta": theta}
  out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": scaling}
  if architecture in LOCAL_THETA_ARCHITECTURES:
    local = cfg.rope_local_theta if cfg.rope_local_theta is not None else theta
    out["rope_local_base_freq"] = local
    out["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": local}}
  else:
    if cfg.rope_local_theta is not None:
      raise ConfigError(f"model.rope_local_theta={cfg.rope_local_theta} cannot be exported as "
                        f"{architecture}: only {list(LOCAL_THETA_ARCHITECTURES)} have a separate "
                        f"rope base for sliding layers; set it to None")
    out["rope_parameters"] = full
  return out
