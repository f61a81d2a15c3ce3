"""Hugging Face `config.json` <-> ModelConfig for the Llama family (llama, qwen2, mistral) and
Gemma 2 / Gemma 3 text (their own fields in hf_gemma.py).

Only what this decoder computes is accepted: anything that would change the function (rope scaling,
a sliding window, biases on the MLP, another activation) is a ConfigError naming the field.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from research.errors import ConfigError
from research.interop import hf_gemma
from research.models.config import HF_ARCHITECTURES, ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = HF_ARCHITECTURES
_CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "mistral": "MistralForCausalLM", **hf_gemma.CLASS_NAMES}
_DEFAULT_ROPE_TYPES = (None, "default")


def _require(d: Mapping[str, Any], key: str, model_type: str) -> Any:
  if d.get(key) is None:
    raise ConfigError(f"HF config for {model_type!r} has no {key!r}; config.json is incomplete")
  return d[key]


def _rope_theta(d: Mapping[str, Any]) -> float:
  """rope_theta from transformers 5 `rope_parameters` or the older top-level `rope_theta`.

  Scaled RoPE (linear, dynamic, yarn, llama3, ...) changes every position's angle, and this
  decoder has only the plain rotation, so any other type is refused rather than silently ignored.
  """
  theta = d.get("rope_theta")
  for key in ("rope_parameters", "rope_scaling"):
    rope = d.get(key)
    if rope is None:
      continue
    if not isinstance(rope, Mapping):
      raise ConfigError(f"HF config field {key!r} must be a dict or null, got {rope!r}")
    if any(isinstance(v, Mapping) for v in rope.values()):
      raise ConfigError(f"HF config field {key!r} has per-layer-type rope parameters "
                        f"({sorted(rope)}); only one global rope is supported")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _DEFAULT_ROPE_TYPES:
      raise ConfigError(
          f"HF config {key}.rope_type={rope_type!r} is not supported: this decoder implements only "
          f"default (unscaled) RoPE. Use a checkpoint without rope scaling, or remove the "
          f"{key!r} entry if you accept the changed positions.")
    if rope.get("rope_theta") is not None:
      theta = rope["rope_theta"]
  return float(theta) if theta is not None else 10000.0


def _check_sliding_window(d: Mapping[str, Any], model_type: str, num_layers: int,
                          max_positions: int) -> None:
  """Accept a sliding window only where it can never bind: full causal attention is all we have."""
  window = d.get("sliding_window")
  if model_type == "qwen2":
    if not d.get("use_sliding_window", False):
      if window is not None:
        log.info("qwen2 config has sliding_window=%s but use_sliding_window=false; transformers "
                 "uses full attention too, so it is ignored", window)
      return
    layer_types = d.get("layer_types")
    if layer_types is None:
      max_window_layers = d.get("max_window_layers", 28)
      layer_types = ["sliding_attention" if window is not None and i >= max_window_layers
                     else "full_attention" for i in range(num_layers)]
    if "sliding_attention" not in layer_types:
      return
  if window is None or window >= max_positions:
    return
  raise ConfigError(
      f"HF config sliding_window={window} < max_position_embeddings={max_positions}: {model_type} "
      f"would attend only to the last {window} tokens, but this decoder's attention is full causal, "
      f"so logits would differ beyond {window} tokens. Set sliding_window to null (or >= "
      f"max_position_embeddings) in config.json if you accept full attention.")


def _token_id(d: Mapping[str, Any], key: str) -> int | None:
  value = d.get(key)
  if isinstance(value, (list, tuple)):
    if not value:
      return None
    if len(value) > 1:
      log.warning("HF config %s=%s is a list; recording only the first id %s", key, value,
                  value[0])
    value = value[0]
  return None if value is None else int(value)


def model_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from the dict of an HF `config.json`; `overrides` set non-HF fields (e.g. dtype)."""
  model_type = hf_config.get("model_type")
  if model_type == "gemma3":
    raise hf_gemma.multimodal_error(hf_config)
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise ConfigError(
        f"unsupported architecture model_type={model_type!r} (architectures="
        f"{hf_config.get('architectures')}); supported: {list(SUPPORTED_ARCHITECTURES)}")
  gemma = model_type in hf_gemma.GEMMA_ARCHITECTURES
  d = hf_gemma.with_defaults(hf_config, model_type) if gemma else hf_config
  act = d.get("hidden_act", "silu")
  if not gemma and act != "silu":
    raise ConfigError(f"HF config hidden_act={act!r}: this decoder's MLP is SwiGLU (silu) only")
  if d.get("mlp_bias", False):
    raise ConfigError("HF config mlp_bias=true: this decoder's MLP has no biases")
  if model_type != "qwen2" and d.get("attention_bias", False):
    # Llama's attention_bias also puts a bias on o_proj, which this decoder does not have.
    raise ConfigError(f"HF config attention_bias=true ({model_type}) adds biases to q/k/v/o_proj; "
                      f"this decoder has q/k/v biases only (the qwen2 layout)")

  hidden = int(_require(d, "hidden_size", model_type))
  heads = int(_require(d, "num_attention_heads", model_type))
  num_layers = int(_require(d, "num_hidden_layers", model_type))
  max_positions = int(d.get("max_position_embeddings") or 2048)
  kv_heads = d.get("num_key_value_heads")
  head_dim = d.get("head_dim")
  # Keep head_dim unset when it is the implied one, so configs compare equal after a round trip.
  if head_dim is not None and (hidden % heads == 0 and int(head_dim) == hidden // heads):
    head_dim = None
  if not gemma:
    _check_sliding_window(d, model_type, num_layers, max_positions)
  fields = dict(
      vocab_size=int(_require(d, "vocab_size", model_type)),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
      head_dim=None if head_dim is None else int(head_dim),
      mlp_dim=int(_require(d, "intermediate_size", model_type)),
      rope_theta=_rope_theta(d),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      attention_bias=model_type == "qwen2",  # qwen2 always has q/k/v biases
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      max_position_embeddings=max_positions,
      bos_token_id=_token_id(d, "bos_token_id"),
      eos_token_id=_token_id(d, "eos_token_id"),
      pad_token_id=_token_id(d, "pad_token_id"),
      hf_architecture=model_type,
  )
  if gemma:
    fields.update(hf_gemma.fields_from_hf(d, model_type, num_layers))
  fields.update(overrides)
  return ModelConfig(**fields)


def hf_config_from_model_config(cfg: ModelConfig, architecture: str | None = None,
                                dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict that `AutoModelForCausalLM.from_pretrained` loads without custom code.

  `architecture` defaults to the one the config was imported from, else qwen2 when the config has
  attention biases, else llama. Both the
  transformers 5 (`rope_parameters`, `dtype`) and 4.x (`rope_theta`, `torch_dtype`) spellings are
  written so either version reads the same model.
  """
  arch = architecture or cfg.hf_architecture or ("qwen2" if cfg.attention_bias else "llama")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConfigError(f"unsupported export architecture {arch!r}; choose one of "
                      f"{list(SUPPORTED_ARCHITECTURES)}")
  if arch != "qwen2" and cfg.attention_bias:
    raise ConfigError(f"model.attention_bias=true cannot be exported as {arch}: only qwen2 has "
                      f"q/k/v biases without an o_proj bias; export with architecture='qwen2'")
  hf_gemma.check_block(cfg, arch)
  out: dict[str, Any] = {
      "architectures": [_CLASS_NAMES[arch]],
      "model_type": arch,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if arch == "llama":
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  elif arch in hf_gemma.GEMMA_ARCHITECTURES:
    out.update(hf_gemma.fields_to_hf(cfg, arch))
    del out["hidden_act"]
  elif arch == "qwen2":
    # Qwen2 always has q/k/v biases; export writes zeros when the config has none.
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
               layer_types=["full_attention"] * cfg.num_layers)
  else:
    out.update(sliding_window=None)
  return out
