"""Load a Hugging Face Llama/Qwen2/Mistral/Qwen3/Gemma 2/Gemma 3 text safetensors checkpoint into
this decoder's scanned params.

Tensors are read one at a time and each stacked [L, ...] leaf is filled layer by layer, so the host
holds about one leaf beyond what is already placed; with `shardings` each leaf goes straight onto
its devices. `tensor_layout` is the name/shape table that the exporter shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from research.errors import CheckpointError, ConfigError
from research.interop.hf_config import model_config_from_hf
from research.models.config import ModelConfig

Params = dict[str, Any]
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Buffers some older exports carry; they are recomputed from rope_theta, never learned.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor family and where it lives here.

  `hf_name` has `{i}` for per-layer tensors, which stack into a leading [L] axis here. `kind` picks
  the layout change; `hf_shape` / `shape` are the per-layer shapes on each side.
  """
  path: tuple[str, ...]
  hf_name: str
  kind: str  # identity | transpose | heads_in | heads_bias | heads_out
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name


def tensor_layout(cfg: ModelConfig, *, attention_bias: bool | None = None) -> list[TensorSpec]:
  """Every tensor, in the order transformers writes them."""
  e, f, v, d = cfg.hidden_size, cfg.mlp_dim, cfg.vocab_size, cfg.resolved_head_dim
  h, k = cfg.num_heads, cfg.num_kv_heads
  bias = cfg.attention_bias if attention_bias is None else attention_bias
  p = "model.layers.{i}."
  specs = [TensorSpec(("embed", "embedding"), "model.embed_tokens.weight", "identity", (v, e),
                      (v, e))]
  for name, n in (("q", h), ("k", k), ("v", k)):
    specs.append(TensorSpec(("layers", "attn", name, "kernel"), p + f"self_attn.{name}_proj.weight",
                            "heads_in", (n * d, e), (e, n, d)))
    if bias:
      specs.append(TensorSpec(("layers", "attn", name, "bias"), p + f"self_attn.{name}_proj.bias",
                              "heads_bias", (n * d,), (n, d)))
  specs.append(TensorSpec(("layers", "attn", "o", "kernel"), p + "self_attn.o_proj.weight",
                          "heads_out", (e, h * d), (h, d, e)))
  if cfg.qk_norm:
    specs += [TensorSpec(("layers", "attn", f"{name}_norm", "scale"),
                         p + f"self_attn.{name}_norm.weight", "identity", (d,), (d,))
              for name in ("q", "k")]
  specs += [
      TensorSpec(("layers", "mlp", "gate", "kernel"), p + "mlp.gate_proj.weight", "transpose",
                 (f, e), (e, f)),
      TensorSpec(("layers", "mlp", "up", "kernel"), p + "mlp.up_proj.weight", "transpose", (f, e),
                 (e, f)),
      TensorSpec(("layers", "mlp", "down", "kernel"), p + "mlp.down_proj.weight", "transpose",
                 (e, f), (f, e)),
      TensorSpec(("layers", "attn_norm", "scale"), p + "input_layernorm.weight", "identity", (e,),
                 (e,)),
  ]
  # Llama's post_attention_layernorm is the pre-MLP norm; Gemma's normalises the attention's
  # output, and pre_feedforward_layernorm is its pre-MLP norm.
  norms = [("mlp_norm", "post_attention_layernorm")]
  if cfg.post_norms:
    norms = [("attn_post_norm", "post_attention_layernorm"),
             ("mlp_norm", "pre_feedforward_layernorm"),
             ("mlp_post_norm", "post_feedforward_layernorm")]
  specs += [TensorSpec(("layers", ours, "scale"), p + f"{theirs}.weight", "identity", (e,), (e,))
            for ours, theirs in norms]
  specs.append(TensorSpec(("final_norm", "scale"), "model.norm.weight", "identity", (e,), (e,)))
  if not cfg.tie_embeddings:
    specs.append(TensorSpec(("lm_head", "kernel"), "lm_head.weight", "transpose", (v, e), (e, v)))
  return specs


def from_hf_layout(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  """HF tensor (Linear weights are [out, in]) -> this decoder's per-layer layout ([in, out])."""
  if spec.kind in ("transpose", "heads_in", "heads_out"):
    x = x.T
  return x.reshape(spec.shape)


def to_hf_layout(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
  if spec.kind == "heads_in":
    return x.reshape(spec.shape[0], -1).T
  if spec.kind == "heads_out":
    return x.reshape(-1, spec.shape[-1]).T
  if spec.kind == "transpose":
    return x.T
  return x.reshape(spec.hf_shape)


def hf_names(spec: TensorSpec, num_layers: int) -> list[str]:
  if spec.per_layer:
    return [spec.hf_name.format(i=i) for i in range(num_layers)]
  return [spec.hf_name]


def _weight_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
  index = hf_dir / INDEX_NAME
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{index} is not a safetensors index (needs 'weight_map')") from e
    files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
      raise CheckpointError(f"{index} names shard files that are missing: {missing}")
    return files
  if (hf_dir / WEIGHTS_NAME).is_file():
    return [hf_dir / WEIGHTS_NAME]
  pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
  if pickles:
    raise CheckpointError(
        f"{hf_dir} has only pickled weights {pickles}; only safetensors are read (pickles are "
        f"never unpickled: loading one can run arbitrary code). Convert them where you trust the "
        f"file: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, "
        f"safe_serialization=True)")
  raise CheckpointError(f"{hf_dir} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _check_tokenizer(hf_dir: pathlib.Path, cfg: ModelConfig) -> None:
  if not any((hf_dir / name).is_file() for name in _TOKENIZER_FILES):
    return
  from transformers import AutoTokenizer  # slow import; only when a tokenizer is present

  n = len(AutoTokenizer.from_pretrained(str(hf_dir)))
  if n > cfg.vocab_size:
    raise CheckpointError(
        f"the tokenizer in {hf_dir} has {n} tokens but config.json vocab_size={cfg.vocab_size}: "
        f"ids >= {cfg.vocab_size} would index past the embedding. Use the tokenizer the model was "
        f"trained with, or resize the embeddings before exporting.")


def _leaf(tree: Any, path: tuple[str, ...], what: str) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise ConfigError(f"{what} has no entry for param {'/'.join(path)}")
    tree = tree[key]
  return tree


def _set_leaf(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


@contextlib.contextmanager
def _open_all(files: list[pathlib.Path]) -> Iterator[dict[str, Any]]:
  """name -> open safetensors handle (memory-mapped; a tensor is read only by get_tensor)."""
  with contextlib.ExitStack() as stack:
    by_name: dict[str, Any] = {}
    for path in files:
      try:
        handle = stack.enter_context(safe_open(str(path), framework="numpy"))
      except (SafetensorError, OSError) as e:  # truncated, garbage, unreadable
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download or "
                              "export it again") from e
      for name in handle.keys():
        by_name[name] = handle
    yield by_name


def _check_names_and_shapes(specs: list[TensorSpec], cfg: ModelConfig, by_name: Mapping[str, Any],
                            hf_dir: pathlib.Path) -> None:
  """Fail before reading any data: the headers alone say what is missing, extra or misshapen."""
  expected = set()
  for spec in specs:
    for name in hf_names(spec, cfg.num_layers):
      expected.add(name)
      if name not in by_name:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {hf_dir}; "
                              f"config.json promises it ({cfg.hf_architecture}, "
                              f"{cfg.num_layers} layers)")
      shape = tuple(by_name[name].get_slice(name).get_shape())
      if shape != spec.hf_shape:
        raise CheckpointError(f"tensor {name!r} in {hf_dir} has shape {list(shape)}, expected "
                              f"{list(spec.hf_shape)} from config.json; the config does not "
                              f"match the weights")
  # A tied checkpoint may still carry a copy of the embedding as lm_head.
  allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
  extra = sorted(n for n in by_name if n not in expected and n not in allowed
                 and not _IGNORED.match(n))
  if extra:
    raise CheckpointError(f"{len(extra)} unexpected tensors in {hf_dir} that this decoder has no "
                          f"place for: {extra[:8]}{' ...' if len(extra) > 8 else ''}")


def load_hf_checkpoint(hf_dir: str | pathlib.Path, shardings: Any = None,
                       dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """(ModelConfig, scanned params) from an HF checkpoint directory.

  `dtype`: the params' dtype (and the config's param_dtype); None keeps float32. `shardings`: a
  pytree matching params of `jax.sharding.Sharding`; each leaf is placed as soon as it is built.
  Without it each leaf goes to the default device.
  """
  hf_dir = pathlib.Path(hf_dir)
  config_path = hf_dir / "config.json"
  if not config_path.is_file():
    raise CheckpointError(f"{config_path} not found: {hf_dir} is not a Hugging Face model dir")
  try:
    hf_config = json.loads(config_path.read_text())
  except ValueError as e:
    raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
  cfg = model_config_from_hf(hf_config, param_dtype=dtype or "float32")
  files = _weight_files(hf_dir)
  _check_tokenizer(hf_dir, cfg)
  specs = tensor_layout(cfg)
  np_dtype = np.dtype(cfg.weight_dtype)
  params: Params = {}
  with _open_all(files) as by_name:
    _check_names_and_shapes(specs, cfg, by_name, hf_dir)
    for spec in specs:
      names = hf_names(spec, cfg.num_layers)
      out = np.empty(((len(names),) if spec.per_layer else ()) + spec.shape, dtype=np_dtype)
      for i, name in enumerate(names):
        x = from_hf_layout(spec, by_name[name].get_tensor(name))
        if spec.per_layer:
          out[i] = x
        else:
          out[...] = x
        del x
      sharding = _leaf(shardings, spec.path, "shardings") if shardings is not None else None
      placed = jax.device_put(out, sharding) if sharding is not None else jax.device_put(out)
      del out  # the host copy goes before the next leaf is built
      _set_leaf(params, spec.path, placed)
  return cfg, params


def read_safetensors_dir(hf_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint dir by name (for tests and small models: it reads them all)."""
  with _open_all(_weight_files(pathlib.Path(hf_dir))) as by_name:
    return {name: handle.get_tensor(name) for name, handle in by_name.items()}

