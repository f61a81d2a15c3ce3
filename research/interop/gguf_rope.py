"""llama.cpp's rope scaling in a GGUF file -> the HF `rope_scaling` dict with the same angles.

transformers' own GGUF loader reads none of this for llama, qwen2 and mistral files (it keeps only
`rope.freq_base`; it drops the `rope_freqs` tensor and every `rope.scaling.*` key), so it runs such
files with plain RoPE. Here each setting maps to the HF rope type that computes llama.cpp's angles:
  * `rope.scaling.type` linear (or the older `rope.scale_linear`): positions divided by `factor`,
    which is HF 'linear'.
  * yarn: llama.cpp's `rope_yarn` (the same correction range, floored and ceiled, the same ramp and
    the cos/sin factor 1 + 0.1 ln(factor)) is HF 'yarn' with `original_context_length` as the
    original length; only llama.cpp's default ext and attention factors have an HF equivalent.
  * the `rope_freqs` tensor llama.cpp's converter writes for Llama 3.x: per-frequency divisors,
    which are HF 'llama3' when they are what that converter computes from factor = their maximum,
    low_freq_factor 1, high_freq_factor 4 and the original length (8192 unless
    `rope.scaling.original_context_length` says otherwise).
Anything else is a ConfigError naming the key, rather than a model run with changed positions.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from research.errors import ConfigError

# llama.cpp's converter uses this when the HF config has no top-level original length (Llama 3.x).
LLAMA3_ORIGINAL_CONTEXT = 8192
_REFUSAL = ("; transformers' GGUF loader ignores it (plain RoPE) and it has no exact equivalent "
            "here, so the file is refused rather than run with changed positions")


def llama3_freq_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original: int) -> np.ndarray:
  """The `rope_freqs` tensor llama.cpp's converter (LlamaModel.generate_extra_tensors) writes."""
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
  out = []
  for freq in freqs.astype(np.float64):
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      out.append(1.0)
    elif wavelen > low_wavelen:
      out.append(factor)
    else:
      smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def _llama3(factors: np.ndarray, meta: Mapping[str, Any], arch: str, theta: float,
            head_dim: int, where: str) -> dict[str, Any] | None:
  if factors.shape != (head_dim // 2,):
    raise ConfigError(f"{where}: rope_freqs.weight has shape {list(factors.shape)}, expected "
                      f"[{head_dim // 2}] (one divisor per rotated frequency)")
  if np.all(factors == 1):
    return None
  original = int(meta.get(f"{arch}.rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT))
  scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": original}
  expected = llama3_freq_factors(theta, head_dim, scaling["factor"], 1.0, 4.0, original)
  if not np.allclose(factors, expected, rtol=1e-5, atol=0):
    raise ConfigError(f"{where}: rope_freqs.weight is not llama3 rope scaling with factor "
                      f"{scaling['factor']}, low/high_freq_factor 1/4 and original context "
                      f"{original}{_REFUSAL}")
  return scaling


def _yarn(meta: Mapping[str, Any], arch: str, factor: float, context_length: int,
          where: str) -> dict[str, Any]:
  key = f"{arch}.rope.scaling."
  # llama.cpp's defaults: ext factor -1 (auto: 1 for yarn), attention factors 1, no log multiplier.
  defaults = {"yarn_ext_factor": (-1.0, 1.0), "attn_factor": (1.0,), "yarn_attn_factor": (1.0,),
              "yarn_log_multiplier": (0.0,)}
  for name, allowed in defaults.items():
    value = meta.get(key + name)
    if value is not None and float(value) not in allowed:
      raise ConfigError(f"{where}: {key}{name}={value} changes llama.cpp's YaRN away from HF's "
                        f"(which has only its defaults {allowed}){_REFUSAL}")
  scaling = {"rope_type": "yarn", "factor": factor,
             "original_max_position_embeddings": int(meta.get(key + "original_context_length",
                                                              context_length))}
  for name, hf_name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
    if meta.get(key + name) is not None:
      scaling[hf_name] = float(meta[key + name])
  return scaling


def rope_scaling_from_gguf(meta: Mapping[str, Any], arch: str, theta: float, head_dim: int,
                           context_length: int, rope_freqs: np.ndarray | None,
                           where: str = "GGUF file") -> dict[str, Any] | None:
  """The HF rope_scaling dict (None: plain RoPE) for the file's rope metadata and its
  `rope_freqs` tensor (float32 [head_dim // 2], None when absent)."""
  key = f"{arch}.rope.scaling."
  rope_type = meta.get(key + "type")
  rope_type = None if rope_type in (None, "none") else str(rope_type)
  factor = meta.get(key + "factor")
  legacy = meta.get(f"{arch}.rope.scale_linear")
  if rope_freqs is not None:
    if rope_type is not None:
      raise ConfigError(f"{where} has both rope_freqs.weight and {key}type={rope_type!r}{_REFUSAL}")
    return _llama3(np.asarray(rope_freqs, np.float32), meta, arch, theta, head_dim, where)
  if rope_type is None:
    if legacy is not None and float(legacy) != 1.0:
      return {"rope_type": "linear", "factor": float(legacy)}
    return None
  if rope_type not in ("linear", "yarn"):
    raise ConfigError(f"{where}: {key}type={rope_type!r}{_REFUSAL}")
  if factor is None:
    raise ConfigError(f"{where}: {key}type={rope_type!r} without {key}factor; the file is "
                      f"incomplete")
  if rope_type == "linear":
    return {"rope_type": "linear", "factor": float(factor)}
  return _yarn(meta, arch, float(factor), context_length, where)
