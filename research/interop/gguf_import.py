"""Load a llama.cpp GGUF file (Llama, Qwen2, Mistral, Gemma 2, Gemma 3 text) into this decoder's
scanned params.

Weights are dequantised to float32 by the `gguf` package and go through the same name/layout table
as a Hugging Face checkpoint (`hf_import.tensor_layout`); the config comes from the file's metadata
and the tokenizer (with its chat template) from transformers' own GGUF reader, so a GGUF file loads
here exactly as `from_pretrained(dir, gguf_file=...)` loads it in transformers.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from research.errors import CheckpointError, ConfigError
from research.interop import hf_gemma
from research.interop.gguf_rope import rope_scaling_from_gguf
from research.interop.hf_config import model_config_from_hf
from research.interop.hf_import import (Params, _leaf, _set_leaf, from_hf_layout, hf_names,
                                        tensor_layout)
from research.models.config import ModelConfig

log = logging.getLogger(__name__)

# Types the `gguf` package dequantises in numpy: the float types, the legacy and the k-quants.
DEQUANTISED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                     "Q4_K", "Q5_K", "Q6_K")
# GGUF `general.architecture` -> HF model_type. llama.cpp writes Mistral 7B-style files as "llama"
# (the same network); the file's name tells them apart, as transformers does.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                      "gemma3": "gemma3_text"}
# llama.cpp stores Gemma's norm weights as the scale it multiplies by, 1 + w; transformers'
# loader (Gemma2TensorProcessor) subtracts the 1 again from every `*norm.weight`, and so does this.
_NORM_PLUS_ONE = ("gemma2", "gemma3")
# Llama 3.x's per-frequency rope divisors (see gguf_rope.py); not a weight.
ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's converter interleaves the rows of q and k for its rotary layout in these
# architectures (convert_hf_to_gguf.py LlamaModel.permute); Qwen2/Qwen3 files keep the HF order.
_PERMUTED_QK = ("llama",)

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma's block: llama.cpp's ffn_norm is the pre-MLP norm, which Gemma calls
# pre_feedforward_layernorm (its post_attention_layernorm normalises the attention's output).
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}


def _import_gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError("reading a .gguf file needs the `gguf` package: pip install gguf") from e
  return gguf


def open_gguf(path: str | os.PathLike) -> Any:
  """A memory-mapped `gguf.GGUFReader` (tensor data is read only when used)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"GGUF file {path} does not exist")
  gguf = _import_gguf()
  try:
    return gguf.GGUFReader(str(path))
  except (ValueError, OSError, KeyError) as e:
    raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e


def gguf_metadata(reader: Any) -> dict[str, Any]:
  """Every scalar and short array field by key; the long tokenizer arrays are left out."""
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
          "tokenizer.ggml.scores")
  meta = {key: field.contents() for key, field in reader.fields.items() if key not in skip}
  if "tokenizer.ggml.tokens" in reader.fields:
    meta["tokenizer.ggml.tokens.count"] = len(reader.fields["tokenizer.ggml.tokens"].data)
  return meta


def hf_model_type(meta: Mapping[str, Any], where: str) -> str:
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ConfigError(f"{where}: GGUF architecture {arch!r} is not supported; supported: "
                      f"{sorted(GGUF_ARCHITECTURES)} (Mistral files are written as 'llama')")
  name = " ".join(str(meta.get(k, "")) for k in ("general.name", "general.basename")).lower()
  if arch == "llama" and "mistral" in name:
    return "mistral"
  return GGUF_ARCHITECTURES[arch]


def hf_config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str],
                        where: str = "GGUF file", rope_freqs: np.ndarray | None = None
                        ) -> dict[str, Any]:
  """The HF `config.json` dict this file's metadata (and its `rope_freqs` tensor, if any)
  describes (validated by model_config_from_hf)."""
  model_type = hf_model_type(meta, where)
  arch = meta["general.architecture"]

  def get(key: str, default: Any = None) -> Any:
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ConfigError(f"{where} has no metadata field {arch}.{key}; the file is incomplete")
    return value

  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
  rotary = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise ConfigError(f"{where}: {arch}.rope.dimension_count={rotary} rotates part of each "
                      f"{head_dim}-wide head; this decoder rotates whole heads only")
  if arch in _NORM_PLUS_ONE:
    return _gemma_hf_config(meta, tensor_names, model_type, arch, where)
  d: dict[str, Any] = {
      "model_type": model_type,
      "hidden_size": hidden,
      "num_hidden_layers": int(get("block_count")),
      "intermediate_size": int(get("feed_forward_length")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(get("context_length")),
      "vocab_size": int(meta.get(f"{arch}.vocab_size") or _vocab_count(meta, where)),
      # llama.cpp writes output.weight only when it is not the embedding.
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
  }
  scaling = rope_scaling_from_gguf(meta, arch, d["rope_theta"], head_dim,
                                   d["max_position_embeddings"], rope_freqs, where)
  if scaling is not None:
    d["rope_scaling"] = scaling
  # No sliding-window metadata is read, as transformers' GGUF loader reads none for these
  # architectures: a "mistral" file then takes MistralConfig's default window (4096), Qwen files
  # none (use_sliding_window defaults to false); see hf_config._sliding_window.
  return d


def _gemma_hf_config(meta: Mapping[str, Any], tensor_names: set[str], model_type: str,
                     arch: str, where: str) -> dict[str, Any]:
  """What transformers' GGUF loader reads for Gemma (integrations/ggml.py): the shapes, the rope
  base, eps and the window; every other field (query_pre_attn_scalar, the soft caps, the
  sliding-layer pattern, Gemma 3's local rope base, token ids) takes the config class's default,
  as there, so a file loads here as it loads in transformers."""
  keys = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
          "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
          "rope.freq_base": "rope_theta", "attention.key_length": "head_dim",
          "attention.head_count": "num_attention_heads",
          "attention.head_count_kv": "num_key_value_heads",
          "attention.layer_norm_rms_epsilon": "rms_norm_eps",
          "attention.sliding_window": "sliding_window", "vocab_size": "vocab_size"}
  d: dict[str, Any] = {"model_type": model_type,
                       "tie_word_embeddings": "output.weight" not in tensor_names}
  for key, name in keys.items():
    if f"{arch}.{key}" in meta:
      d[name] = meta[f"{arch}.{key}"]
  d.setdefault("vocab_size", _vocab_count(meta, where))
  for key, name in (("attn_logit_softcapping", "attn_logit_softcapping"),
                    ("final_logit_softcapping", "final_logit_softcapping")):
    if f"{arch}.{key}" in meta:
      default = hf_gemma.DEFAULTS[model_type][name]
      if default is None or abs(float(meta[f"{arch}.{key}"]) - default) > 1e-6:
        log.warning("%s: %s.%s=%s is not read (transformers' loader takes its default %s); "
                    "the model follows transformers", where, arch, key, meta[f"{arch}.{key}"],
                    default)
  return d


def _vocab_count(meta: Mapping[str, Any], where: str) -> int:
  if "tokenizer.ggml.tokens.count" not in meta:
    raise ConfigError(f"{where} states no vocab_size and holds no tokenizer.ggml.tokens")
  return int(meta["tokenizer.ggml.tokens.count"])


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
  """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` in GGUF architecture
  `arch`'s block; None for unknown names."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  layer_names = _GEMMA_LAYER_NAMES if arch in _NORM_PLUS_ONE else _LAYER_NAMES
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
    return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
  return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row interleave: per head, rows (pair, half) -> (half, pair)."""
  rest = w.shape[1:]
  return w.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _dequantise(tensor: Any, gguf: Any) -> np.ndarray:
  """[out, in] float32 (HF's Linear layout); GGUF lists dims innermost first."""
  x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  return np.asarray(x, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _tensors_by_hf_name(reader: Any, where: str, arch: str) -> dict[str, Any]:
  by_name, unknown, bad_types = {}, [], set()
  for t in reader.tensors:
    if t.name == ROPE_FREQS:  # read into the config's rope_scaling (gguf_model_config)
      continue
    name = hf_tensor_name(t.name, arch)
    if name is None:
      unknown.append(t.name)
    elif t.tensor_type.name not in DEQUANTISED_TYPES:
      bad_types.add(t.tensor_type.name)
    by_name[name] = t
  if unknown:
    raise CheckpointError(f"{where} has tensors this decoder has no place for: {unknown[:8]}"
                          f"{' ...' if len(unknown) > 8 else ''}")
  if bad_types:
    raise CheckpointError(f"{where} holds tensors of quantisation type {sorted(bad_types)}, which "
                          f"cannot be dequantised here; supported: {', '.join(DEQUANTISED_TYPES)}")
  return by_name


def gguf_model_config(path: str | os.PathLike, reader: Any = None) -> ModelConfig:
  reader = reader if reader is not None else open_gguf(path)
  names = {t.name for t in reader.tensors}
  rope_freqs = next((np.asarray(_dequantise(t, _import_gguf()), np.float32).reshape(-1)
                     for t in reader.tensors if t.name == ROPE_FREQS), None)
  return model_config_from_hf(hf_config_from_gguf(gguf_metadata(reader), names, str(path),
                                                  rope_freqs))


def load_gguf_checkpoint(path: str | os.PathLike,
                         shardings: Any = None) -> tuple[ModelConfig, Params]:
  """(ModelConfig, scanned float32 params) from a GGUF file, one leaf on the host at a time.

  `shardings`: a pytree matching params of `jax.sharding.Sharding` (each leaf is placed as soon as
  it is built); without it each leaf goes to the default device.
  """
  gguf = _import_gguf()
  reader = open_gguf(path)
  where = str(path)
  cfg = gguf_model_config(path, reader)
  arch = reader.fields["general.architecture"].contents()
  by_name = _tensors_by_hf_name(reader, where, arch)
  permuted = arch in _PERMUTED_QK
  specs = tensor_layout(cfg)
  expected = {name for spec in specs for name in hf_names(spec, cfg.num_layers)}
  missing = sorted(expected - set(by_name))
  extra = sorted(set(by_name) - expected)
  if missing or extra:
    raise CheckpointError(f"{where} does not match its metadata ({cfg.hf_architecture}, "
                          f"{cfg.num_layers} layers): missing {missing[:8]}, unexpected "
                          f"{extra[:8]}")
  params: Params = {}
  for spec in specs:
    names = hf_names(spec, cfg.num_layers)
    out = np.empty(((len(names),) if spec.per_layer else ()) + spec.shape, dtype=np.float32)
    for i, name in enumerate(names):
      x = _dequantise(by_name[name], gguf)
      if x.shape != spec.hf_shape:
        raise CheckpointError(f"tensor {by_name[name].name} in {where} has shape {list(x.shape)}, "
                              f"expected {list(spec.hf_shape)} from its metadata")
      if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
        x = unpermute_qk(x, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
      if arch in _NORM_PLUS_ONE and by_name[name].name.endswith("norm.weight"):
        x = x - 1
      x = from_hf_layout(spec, x)
      if spec.per_layer:
        out[i] = x
      else:
        out[...] = x
    sharding = _leaf(shardings, spec.path, "shardings") if shardings is not None else None
    placed = jax.device_put(out, sharding) if sharding is not None else jax.device_put(out)
    del out
    _set_leaf(params, spec.path, placed)
  return cfg, params


def gguf_tokenizer(path: str | os.PathLike) -> Any:
  """The file's tokenizer (with its chat template) as transformers builds it from the metadata."""
  path = pathlib.Path(path).resolve()
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  try:
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  except (ValueError, KeyError, OSError) as e:
    raise CheckpointError(f"transformers cannot build a tokenizer from {path}: {e}") from e


def gguf_to_hf_dir(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                   overwrite: bool = False) -> pathlib.Path:
  """Write the GGUF model as a float32 Hugging Face dir (config, safetensors, tokenizer with its
  chat template, generation config), built in a temporary dir and renamed into place."""
  from research.interop.hf_export import export_hf  # pylint: disable=import-outside-toplevel

  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass --overwrite to replace it")
  tokenizer = gguf_tokenizer(path)
  cfg, params = load_gguf_checkpoint(path)
  return export_hf(params, cfg, out_dir, architecture=cfg.hf_architecture, tokenizer=tokenizer,
                   overwrite=overwrite)
