"""Write this decoder's params as a Hugging Face checkpoint that `AutoModelForCausalLM` loads.

Tensors are converted one at a time and each shard file is written from a dict of its own tensors
only, into a temporary directory that is renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import save_file

from research.errors import CheckpointError, ConfigError
from research.interop.hf_config import hf_config_from_model_config
from research.interop.hf_import import (INDEX_NAME, WEIGHTS_NAME, TensorSpec, hf_names,
                                        tensor_layout, to_hf_layout)
from research.models.config import ModelConfig

Params = dict[str, Any]
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size ("5GB")


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise CheckpointError(f"params have no {'/'.join(path)}; the params do not match the config")
    tree = tree[key]
  return tree


def _tensor_sources(params: Params, cfg: ModelConfig, specs: list[TensorSpec], np_dtype: np.dtype,
                    zero_bias: bool) -> list[tuple[str, int, Callable[[], np.ndarray]]]:
  """(HF name, bytes, producer) per tensor; a producer copies one tensor to host when called."""
  scanned = "layers" in params
  sources = []
  for spec in specs:
    layer_path = spec.path[1:] if spec.per_layer else spec.path
    fake = zero_bias and spec.kind == "heads_bias"
    if not fake:
      # Check every shape up front so that a mismatch fails before anything is written.
      if spec.per_layer and not scanned:
        shapes = {tuple(_get(params[f"layers_{i}"], layer_path).shape)
                  for i in range(cfg.num_layers)}
        want = {spec.shape}
      else:
        leaf = _get(params, spec.path)
        shapes = {tuple(leaf.shape)}
        want = {(cfg.num_layers,) + spec.shape if spec.per_layer else spec.shape}
      if shapes != want:
        raise CheckpointError(f"param {'/'.join(spec.path)} has shape {sorted(shapes)}, expected "
                              f"{sorted(want)} from the model config")
    nbytes = int(np.prod(spec.hf_shape)) * np_dtype.itemsize
    for i, name in enumerate(hf_names(spec, cfg.num_layers)):
      def produce(spec=spec, i=i, fake=fake, layer_path=layer_path) -> np.ndarray:
        if fake:  # qwen2 always has q/k/v biases; zeros are exactly "no bias"
          return np.zeros(spec.hf_shape, np_dtype)
        if not spec.per_layer:
          x = _get(params, spec.path)
        elif scanned:
          x = _get(params, spec.path)[i]  # slices on device: one layer crosses to host
        else:
          x = _get(params[f"layers_{i}"], layer_path)
        # Cast first (in numpy, round-to-nearest-even like torch), then lay out contiguously.
        x = np.asarray(jax.device_get(x))
        return np.ascontiguousarray(to_hf_layout(spec, x), dtype=np_dtype)
      sources.append((name, nbytes, produce))
  return sources


def _plan_shards(sources: list, max_shard_bytes: int) -> list[list]:
  shards: list[list] = [[]]
  size = 0
  for source in sources:
    if shards[-1] and size + source[1] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(source)
    size += source[1]
  return shards


def _write_weights(tmp: pathlib.Path, sources: list, max_shard_bytes: int) -> None:
  shards = _plan_shards(sources, max_shard_bytes)
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file({name: produce() for name, _, produce in shards[0]}, str(tmp / WEIGHTS_NAME),
              metadata=metadata)
    return
  weight_map: dict[str, str] = {}
  for k, shard in enumerate(shards):
    filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {name: produce() for name, _, produce in shard}
    save_file(tensors, str(tmp / filename), metadata=metadata)
    del tensors  # one shard at a time on the host
    weight_map.update({name: filename for name, _, _ in shard})
  index = {"metadata": {"total_size": sum(s[1] for s in sources)}, "weight_map": weight_map}
  (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


_NOT_TOKENIZER = ("config.json", "generation_config.json", INDEX_NAME)


def _save_tokenizer(tokenizer: Any, tmp: pathlib.Path, cfg: ModelConfig) -> None:
  """A tokenizer object is saved; a directory's tokenizer files are copied verbatim.

  Copying keeps the files exactly as trained (a load + save can rewrite tokenizer_config.json);
  the loaded tokenizer is used only to check its size against the vocab.
  """
  src = None
  if isinstance(tokenizer, (str, os.PathLike)):
    src = pathlib.Path(tokenizer)
    if not src.is_dir():
      raise CheckpointError(f"tokenizer dir {src} does not exist")
    from transformers import AutoTokenizer  # slow import; only when asked for

    tokenizer = AutoTokenizer.from_pretrained(str(src))
  if len(tokenizer) > cfg.vocab_size:
    raise CheckpointError(
        f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={cfg.vocab_size}; "
        f"export the tokenizer the model was trained with")
  if src is None:
    tokenizer.save_pretrained(str(tmp))
    return
  for path in sorted(src.iterdir()):
    weights = path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    if path.is_file() and not weights and path.name not in _NOT_TOKENIZER:
      shutil.copy2(path, tmp / path.name)


def _install(tmp: pathlib.Path, out_dir: pathlib.Path, overwrite: bool) -> None:
  """Move the finished export into place; an old out_dir goes only after the new one is there."""
  if not out_dir.exists():
    os.replace(tmp, out_dir)
    return
  if not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to "
                          f"replace it")
  old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
  os.replace(out_dir, old / out_dir.name)
  try:
    os.replace(tmp, out_dir)
  except OSError:
    os.replace(old / out_dir.name, out_dir)
    raise
  shutil.rmtree(old, ignore_errors=True)


def export_hf(params: Params, cfg: ModelConfig, out_dir: str | pathlib.Path, *,
              architecture: str | None = None, dtype: str = "float32", tokenizer: Any = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              generation_config: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Write an HF checkpoint dir: config.json, safetensors weights, generation_config.json, tokenizer.

  `params`: scanned or unrolled (per `layers` / `layers_i` keys), numpy or jax (sharded is fine:
  one layer slice at a time crosses to host). `architecture`: llama | qwen2 | mistral; None takes
  `cfg.hf_architecture`, else llama. `tokenizer`: a transformers tokenizer or a directory holding
  one. `generation_config`: fields merged over the config's bos/eos/pad ids. Returns `out_dir`.
  """
  if dtype not in EXPORT_DTYPES:
    raise ConfigError(f"export dtype={dtype!r}; choose one of {EXPORT_DTYPES}")
  if max_shard_bytes <= 0:
    raise ConfigError(f"max_shard_bytes={max_shard_bytes} must be positive")
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to "
                          f"replace it")
  hf_config = hf_config_from_model_config(cfg, architecture, dtype)
  arch = hf_config["model_type"]
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  zero_bias = arch == "qwen2" and not cfg.attention_bias
  specs = tensor_layout(cfg, attention_bias=cfg.attention_bias or zero_bias)
  sources = _tensor_sources(params, cfg, specs, np.dtype(jax.numpy.dtype(dtype)), zero_bias)

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become out_dir's mode
  try:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(cfg, k) is not None}
    gen.update(generation_config or {})
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
      _save_tokenizer(tokenizer, tmp, cfg)
    _write_weights(tmp, sources, max_shard_bytes)
    _install(tmp, out_dir, overwrite)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
