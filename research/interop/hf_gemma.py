"""Gemma 2 and Gemma 3 (text) in Hugging Face `config.json` <-> ModelConfig: the fields of Gemma's
block (norm offset, GeGLU, scaled embeddings, post-norms, attention scale, soft caps, sliding
layers) that the Llama-family parsing in hf_config.py does not read.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from research.errors import ConfigError
from research.models.config import ModelConfig

log = logging.getLogger(__name__)

GEMMA_ARCHITECTURES = ("gemma2", "gemma3_text")
CLASS_NAMES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# transformers' one-label classifiers; Gemma3ForSequenceClassification is the multimodal model's.
CLASSIFIER_NAMES = {"gemma2": "Gemma2ForSequenceClassification",
                    "gemma3_text": "Gemma3TextForSequenceClassification"}
HIDDEN_ACTIVATION = "gelu_pytorch_tanh"  # transformers' name for the tanh GELU
# What every Gemma block has; the Llama family has the ModelConfig defaults of these fields.
BLOCK = dict(norm_offset=1.0, mlp_activation="gelu_tanh", embed_scale=True, post_norms=True)
LLAMA_BLOCK = dict(norm_offset=0.0, mlp_activation="silu", embed_scale=False, post_norms=False)
# transformers' config-class defaults (Gemma2Config, Gemma3TextConfig) of the non-shape fields: a
# config.json that omits one gets these in transformers, and GGUF files omit most of them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(num_key_value_heads=4, head_dim=256, hidden_activation=HIDDEN_ACTIVATION,
                   max_position_embeddings=8192, rms_norm_eps=1e-6, pad_token_id=0,
                   eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, rope_theta=10000.0,
                   attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   use_bidirectional_attention=None),
    "gemma3_text": dict(num_key_value_heads=4, head_dim=256, hidden_activation=HIDDEN_ACTIVATION,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
                        sliding_window_pattern=6, final_logit_softcapping=None,
                        attn_logit_softcapping=None, use_bidirectional_attention=False),
}


def with_defaults(d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
  """`d` with transformers' defaults for the fields it omits (an explicit null stays null)."""
  return {**DEFAULTS[model_type], **d}


def multimodal_error(d: Mapping[str, Any]) -> ConfigError:
  """The one line for a Gemma 3 vision-language config (model_type gemma3, a text_config)."""
  text_type = (d.get("text_config") or {}).get("model_type", "gemma3_text")
  return ConfigError(
      f"model_type='gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration, vision + "
      f"text); only its text model is supported: use a checkpoint with model_type={text_type!r} "
      f"(Gemma3ForCausalLM, e.g. gemma-3-1b)")


def _layer_types(d: Mapping[str, Any], model_type: str, num_layers: int,
                 window: int | None) -> tuple[str, ...] | None:
  """transformers' per-layer attention types: `layer_types` as given, else Gemma 2's alternation
  (sliding first) or Gemma 3's `sliding_window_pattern` (every pattern-th layer full)."""
  if window is None:
    return None
  types = d.get("layer_types")
  if types is None:
    pattern = 2 if model_type == "gemma2" else int(d.get("sliding_window_pattern") or 6)
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
             for i in range(num_layers)]
  return tuple(types)


def fields_from_hf(d: Mapping[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
  """The ModelConfig fields of a Gemma config (already `with_defaults`) beyond the shapes."""
  act = d.get("hidden_activation") or d.get("hidden_act")
  if act != HIDDEN_ACTIVATION:
    raise ConfigError(f"HF config hidden_activation={act!r}: this decoder's Gemma MLP is GeGLU "
                      f"with {HIDDEN_ACTIVATION!r} only")
  if d.get("use_bidirectional_attention"):
    raise ConfigError(f"HF config use_bidirectional_attention=true ({model_type}): this decoder "
                      f"is causal only; use a causal-LM checkpoint")
  attn_cap = d.get("attn_logit_softcapping")
  if model_type == "gemma3_text" and attn_cap is not None:
    # Gemma3Attention never passes the cap to its attention function.
    log.info("gemma3_text config has attn_logit_softcapping=%s, which transformers does not "
             "apply; it is ignored here too", attn_cap)
    attn_cap = None
  window = d.get("sliding_window")
  window = None if window is None else int(window)
  layer_types = _layer_types(d, model_type, num_layers, window)
  if layer_types is not None and "sliding_attention" not in layer_types:
    window, layer_types = None, None  # no layer slides: the window never applies
  scalar = d.get("query_pre_attn_scalar")
  return dict(
      BLOCK,
      query_pre_attn_scalar=None if scalar is None else float(scalar),
      attn_logit_softcap=None if attn_cap is None else float(attn_cap),
      final_logit_softcap=(None if d.get("final_logit_softcapping") is None
                           else float(d["final_logit_softcapping"])),
      sliding_window=window,
      layer_types=layer_types,
      qk_norm=model_type == "gemma3_text",
  )


def check_block(cfg: ModelConfig, arch: str) -> None:
  """Export refuses a config whose block is not `arch`'s: its checkpoint would load into a
  different function."""
  gemma = arch in GEMMA_ARCHITECTURES
  want = BLOCK if gemma else LLAMA_BLOCK
  for name, value in want.items():
    if getattr(cfg, name) != value:
      raise ConfigError(f"model.{name}={getattr(cfg, name)!r} cannot be exported as {arch}, whose "
                        f"block has {name}={value!r}; export with the architecture the model was "
                        f"built as ({cfg.hf_architecture or 'llama'})")
  if not gemma:
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      if getattr(cfg, name) is not None:
        raise ConfigError(f"model.{name}={getattr(cfg, name)} cannot be exported as {arch}, "
                          f"which has no such field; export as gemma2")
  if gemma and cfg.qk_norm != (arch == "gemma3_text"):
    raise ConfigError(f"model.qk_norm={cfg.qk_norm} cannot be exported as {arch}: Gemma 3 always "
                      f"has q/k norms and Gemma 2 never; export as "
                      f"{'gemma3_text' if cfg.qk_norm else 'gemma2'}")
  if arch == "gemma3_text" and cfg.attn_logit_softcap is not None:
    raise ConfigError(f"model.attn_logit_softcap={cfg.attn_logit_softcap} cannot be exported as "
                      f"gemma3_text: transformers' Gemma 3 does not apply it; export as gemma2")


def fields_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
  """The Gemma-specific `config.json` entries (beyond the Llama-family ones) for `cfg`."""
  scalar = cfg.resolved_head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
  if not float(scalar).is_integer():
    raise ConfigError(f"model.query_pre_attn_scalar={scalar} cannot be exported as {arch}: "
                      f"transformers takes an integer there; round it")
  out: dict[str, Any] = {
      "hidden_activation": HIDDEN_ACTIVATION,
      "query_pre_attn_scalar": int(scalar),  # transformers' config classes check for an int
      "attn_logit_softcapping": cfg.attn_logit_softcap,
      "final_logit_softcapping": cfg.final_logit_softcap,
      "attention_bias": False,
      "use_bidirectional_attention": False,
      "sliding_window": cfg.sliding_window,
      # Written out, not left to the class's default pattern: the layers' types are the config's.
      "layer_types": list(cfg.layer_types) if cfg.layer_types is not None else (
          ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers()]),
  }
  if cfg.sliding_window is None:
    # Gemma's classes read layer_types and always build a sliding mask for its sliding layers;
    # a window as long as the positions makes every layer see everything, as this config does.
    out["sliding_window"] = cfg.max_position_embeddings
  if arch == "gemma2":
    out.pop("use_bidirectional_attention")
  return out
