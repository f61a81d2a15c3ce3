"""Hugging Face `config.json` <-> ModelConfig for the Llama family (llama, qwen2, mistral, qwen3)
and Gemma 2 / Gemma 3 text (their own fields in hf_gemma.py).

Only what this decoder computes is accepted: anything that would change the function (a rope type
it lacks, biases on the MLP, another activation) is a ConfigError naming the field. Rope settings go
through `hf_rope` (both transformers 4.x and 5.x spellings). Sliding windows are read
as transformers reads them (`_sliding_window`) and written back so a round trip is exact.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from research.errors import ConfigError
from research.interop import hf_gemma
from research.interop.hf_rope import rope_fields_from_hf, rope_fields_to_hf
from research.models.config import HF_ARCHITECTURES, ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = HF_ARCHITECTURES
_CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
                **hf_gemma.CLASS_NAMES}
_QWEN = ("qwen2", "qwen3")  # use_sliding_window / max_window_layers / layer_types
# transformers' defaults where config.json leaves a field out.
_DEFAULT_WINDOW = 4096  # MistralConfig, Qwen2Config, Qwen3Config
_DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2Config, Qwen3Config
_QWEN3_HEAD_DIM = 128
_LLAMA_FAMILY = ("llama", "qwen2", "mistral", "qwen3")  # of these only qwen3 has q/k norms


def _require(d: Mapping[str, Any], key: str, model_type: str) -> Any:
  if d.get(key) is None:
    raise ConfigError(f"HF config for {model_type!r} has no {key!r}; config.json is incomplete")
  return d[key]


def _sliding_window(d: Mapping[str, Any], model_type: str,
                    num_layers: int) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, layer_types) as transformers applies them.

  Mistral slides every layer by `sliding_window` (4096 when absent, null: none) and ignores
  `layer_types`. Qwen2/Qwen3 slide only with `use_sliding_window`, then the layers `layer_types`
  marks, or without it those at index >= `max_window_layers` (Qwen2Config.__post_init__).
  """
  if model_type == "mistral":
    window = d.get("sliding_window", _DEFAULT_WINDOW)
    return (None if window is None else int(window)), None
  if model_type not in _QWEN or not d.get("use_sliding_window", False):
    return None, None
  window = d.get("sliding_window", _DEFAULT_WINDOW)
  if window is None:
    return None, None
  layer_types = d.get("layer_types")
  if layer_types is None:
    first = d.get("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS)
    layer_types = ["sliding_attention" if i >= first else "full_attention"
                   for i in range(num_layers)]
  return int(window), tuple(layer_types)


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
    # Llama's and Qwen3's attention_bias also put a bias on o_proj, which this decoder lacks.
    raise ConfigError(f"HF config attention_bias=true ({model_type}) adds biases to q/k/v/o_proj; "
                      f"this decoder has q/k/v biases only (the qwen2 layout)")

  hidden = int(_require(d, "hidden_size", model_type))
  heads = int(_require(d, "num_attention_heads", model_type))
  num_layers = int(_require(d, "num_hidden_layers", model_type))
  max_positions = int(d.get("max_position_embeddings") or 2048)
  kv_heads = d.get("num_key_value_heads")
  head_dim = d.get("head_dim", _QWEN3_HEAD_DIM if model_type == "qwen3" else None)
  # Keep head_dim unset when it is the implied one, so configs compare equal after a round trip.
  if head_dim is not None and (hidden % heads == 0 and int(head_dim) == hidden // heads):
    head_dim = None
  window, layer_types = _sliding_window(d, model_type, num_layers)
  fields = dict(
      vocab_size=int(_require(d, "vocab_size", model_type)),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
      head_dim=None if head_dim is None else int(head_dim),
      mlp_dim=int(_require(d, "intermediate_size", model_type)),
      **rope_fields_from_hf(d),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      attention_bias=model_type == "qwen2",  # qwen2 always has q/k/v biases
      qk_norm=model_type == "qwen3",
      sliding_window=window,
      layer_types=layer_types,
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


def _default_architecture(cfg: ModelConfig) -> str:
  sliding = cfg.sliding_layers()
  if cfg.post_norms:  # Gemma's block
    return "gemma3_text" if cfg.qk_norm else "gemma2"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.attention_bias or (any(sliding) and not all(sliding)):
    return "qwen2"
  return "mistral" if any(sliding) else "llama"


def hf_config_from_model_config(cfg: ModelConfig, architecture: str | None = None,
                                dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict that `AutoModelForCausalLM.from_pretrained` loads without custom code.

  `architecture` defaults to the one the config was imported from, else the one that expresses the
  config: qwen3 with q/k norms, qwen2 with attention biases or mixed sliding layers, mistral when
  every layer slides, else llama. Both the
  transformers 5 (`rope_parameters`, `dtype`) and 4.x (`rope_theta`, `torch_dtype`) spellings are
  written so either version reads the same model.
  """
  sliding = cfg.sliding_layers()
  arch = architecture or cfg.hf_architecture or _default_architecture(cfg)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConfigError(f"unsupported export architecture {arch!r}; choose one of "
                      f"{list(SUPPORTED_ARCHITECTURES)}")
  if arch != "qwen2" and cfg.attention_bias:
    raise ConfigError(f"model.attention_bias=true cannot be exported as {arch}: only qwen2 has "
                      f"q/k/v biases without an o_proj bias; export with architecture='qwen2'")
  hf_gemma.check_block(cfg, arch)
  if arch in _LLAMA_FAMILY and cfg.qk_norm != (arch == "qwen3"):
    raise ConfigError(f"model.qk_norm={cfg.qk_norm} cannot be exported as {arch}: of the "
                      f"exported architectures only qwen3 has (and needs) q/k norms; export with "
                      f"architecture='qwen3'" if cfg.qk_norm else
                      f"model.qk_norm=false cannot be exported as qwen3, whose q/k norms are "
                      f"always on; export with architecture='qwen2' or 'llama'")
  if any(sliding) and arch == "llama":
    raise ConfigError(f"model.sliding_window={cfg.sliding_window} cannot be exported as llama, "
                      f"which has no sliding window; export with architecture='mistral' (every "
                      f"layer slides) or 'qwen2'/'qwen3' (per layer)")
  if arch == "mistral" and any(sliding) and not all(sliding):
    raise ConfigError("model.layer_types mixes sliding and full layers, which mistral cannot "
                      "express (it slides every layer); export with architecture='qwen2' or "
                      "'qwen3'")
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
      **rope_fields_to_hf(cfg, arch),
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
  elif arch in _QWEN:
    # Qwen2 always has q/k/v biases; export writes zeros when the config has none. The layer
    # types are written out, so max_window_layers (the first sliding layer) is informative only.
    if arch == "qwen3":
      out.update(attention_bias=False)
    types = ["sliding_attention" if on else "full_attention" for on in sliding]
    out.update(use_sliding_window=cfg.sliding_window is not None,
               sliding_window=cfg.sliding_window,
               max_window_layers=sliding.index(True) if any(sliding) else cfg.num_layers,
               layer_types=types)
  else:
    out.update(sliding_window=cfg.sliding_window if any(sliding) else None)
  return out
