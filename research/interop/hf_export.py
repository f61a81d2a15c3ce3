"""Write this decoder's params as a Hugging Face checkpoint that `AutoModelForCausalLM` loads.

Tensors are converted and written one at a time (safetensors files are streamed, never built in
memory), into a temporary directory that is renamed into place once complete.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from research.errors import CheckpointError, ConfigError
from research.models.heads import SCORE_HEAD
from research.interop.hf_config import hf_config_from_model_config
from research.interop.hf_gemma import CLASSIFIER_NAMES
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


@functools.partial(jax.jit, static_argnums=0)
def _to_hf_on_device(spec: TensorSpec, x: jax.Array, layer: jax.Array | None) -> jax.Array:
  """One HF tensor from a param: layer `layer` of a stacked leaf (traced: one compile per leaf
  shape, not per layer), in the HF layout."""
  if layer is not None:
    x = jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
  return to_hf_layout(spec, x)


class _Source(NamedTuple):
  """One HF tensor to write: `produce()` makes it on the host only when its turn comes."""
  name: str
  shape: tuple[int, ...]
  nbytes: int
  produce: Callable[[], np.ndarray]


def _tensor_sources(params: Params, cfg: ModelConfig, specs: list[TensorSpec], np_dtype: np.dtype,
                    zero_bias: bool) -> list[_Source]:
  """One source per HF tensor, in transformers' order; nothing is copied to host yet."""
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
        layer = i if spec.per_layer and scanned else None
        x = _get(params[f"layers_{i}"], layer_path) if spec.per_layer and not scanned else (
            _get(params, spec.path))
        if isinstance(x, jax.Array):
          # The layer slice and the layout change run on device into a temporary, so only that
          # one tensor crosses to host, and no host copy stays cached on the param itself.
          x = np.asarray(_to_hf_on_device(spec, x, None if layer is None else np.int32(layer)))
        else:
          x = to_hf_layout(spec, np.asarray(x if layer is None else x[layer]))
        # The cast is numpy's (round-to-nearest-even, as torch's); a no-op when already float32.
        return np.ascontiguousarray(x, dtype=np_dtype)
      sources.append(_Source(name, spec.hf_shape, nbytes, produce))
  return sources


def _finite_only(source: _Source) -> _Source:
  """`source` whose tensor is refused when it holds NaN or inf (a diverged run, or a value past
  the export dtype's range)."""
  def produce() -> np.ndarray:
    x = source.produce()
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
      raise CheckpointError(
          f"tensor {source.name} holds {bad:,} non-finite values (NaN/inf) of {x.size:,} in "
          f"{x.dtype}: the weights diverged or overflow the export dtype; export an earlier "
          "checkpoint (--step), or pass --allow-non-finite to write them anyway")
    return x
  return source._replace(produce=produce)


def _plan_shards(sources: list[_Source], max_shard_bytes: int) -> list[list[_Source]]:
  shards: list[list[_Source]] = [[]]
  size = 0
  for source in sources:
    if shards[-1] and size + source.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(source)
    size += source.nbytes
  return shards


# safetensors' names for the export dtypes (its header spells dtypes this way).
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(path: pathlib.Path, sources: list[_Source], np_dtype: np.dtype,
                       metadata: Mapping[str, str]) -> None:
  """Writes the file `safetensors.numpy.save_file` would (byte for byte), one tensor at a time.

  save_file needs every tensor of the file alive at once, which for a single-file export is a
  second copy of the whole model on the host; here the header is written from the shapes alone
  and each tensor is dropped once its bytes are out, so the host holds one tensor at a time.
  """
  # save_file's order and header: tensors sorted by name (one dtype per file), compact JSON with
  # __metadata__ first, space-padded to a multiple of 8 bytes so the data starts aligned.
  ordered = sorted(sources, key=lambda s: s.name)
  header: dict[str, Any] = {"__metadata__": dict(metadata)}
  offset = 0
  for source in ordered:
    header[source.name] = {"dtype": _SAFETENSORS_DTYPES[np_dtype.name],
                           "shape": list(source.shape),
                           "data_offsets": [offset, offset + source.nbytes]}
    offset += source.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for source in ordered:
      x = source.produce()
      if x.shape != source.shape or x.dtype != np_dtype or not x.flags.c_contiguous:
        raise CheckpointError(f"tensor {source.name} came out {x.dtype}{list(x.shape)}, expected "
                              f"a contiguous {np_dtype}{list(source.shape)}")
      f.write(memoryview(x.reshape(-1).view(np.uint8)))
      del x  # before the next tensor is made


def _write_weights(tmp: pathlib.Path, sources: list[_Source], max_shard_bytes: int,
                   np_dtype: np.dtype) -> None:
  shards = _plan_shards(sources, max_shard_bytes)
  metadata = {"format": "pt"}
  if len(shards) == 1:
    _write_safetensors(tmp / WEIGHTS_NAME, shards[0], np_dtype, metadata)
    return
  weight_map: dict[str, str] = {}
  for k, shard in enumerate(shards):
    filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_safetensors(tmp / filename, shard, np_dtype, metadata)
    weight_map.update({source.name: filename for source in shard})
  index = {"metadata": {"total_size": sum(s.nbytes for s in sources)}, "weight_map": weight_map}
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


def export_temp_dir(out_dir: pathlib.Path) -> pathlib.Path:
  """A new hidden directory beside `out_dir` to build the export in, after removing the ones an
  interrupted export to the same `out_dir` left (`.NAME.tmp-*`, `.NAME.old-*`): they can hold a
  whole model, and no export to one `out_dir` runs beside another."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
    for stale in out_dir.parent.glob(pattern):
      if stale.is_dir():
        shutil.rmtree(stale, ignore_errors=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become out_dir's mode
  return tmp


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


def _as_sequence_classifier(hf_config: dict, cfg: ModelConfig) -> None:
  """Turns a causal-LM config.json into transformers' one-label sequence classifier's."""
  if cfg.pad_token_id is None:
    raise CheckpointError("a reward model exports as *ForSequenceClassification, which finds each "
                          "row's last token by pad_token_id: the model config has none; set "
                          "pad_token_id in model_config.json")
  arch = hf_config["model_type"]
  hf_config["architectures"] = [CLASSIFIER_NAMES.get(arch) or hf_config["architectures"][0].replace(
      "ForCausalLM", "ForSequenceClassification")]
  hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                   pad_token_id=cfg.pad_token_id)


def export_hf(params: Params, cfg: ModelConfig, out_dir: str | pathlib.Path, *,
              architecture: str | None = None, dtype: str = "float32", tokenizer: Any = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              generation_config: Mapping[str, Any] | None = None,
              allow_non_finite: bool = False) -> pathlib.Path:
  """Write an HF checkpoint dir: config.json, safetensors weights, generation_config.json, tokenizer.

  `params`: scanned or unrolled (per `layers` / `layers_i` keys), numpy or jax (sharded is fine:
  one layer slice at a time crosses to host). `architecture`: one of HF_ARCHITECTURES; None
  takes `cfg.hf_architecture`, else the one that expresses the config (hf_config). `tokenizer`: a
  transformers tokenizer or a directory holding one. `generation_config`: fields merged over the
  config's bos/eos/pad ids. A tensor holding NaN
or inf is refused unless `allow_non_finite`. Returns `out_dir`.
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
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  score = params.get(SCORE_HEAD)
  if score is not None:  # a reward model: <Arch>ForSequenceClassification, `score` for `lm_head`
    _as_sequence_classifier(hf_config, cfg)
    specs = [spec for spec in specs if spec.path != ("lm_head", "kernel")]
  sources = _tensor_sources(params, cfg, specs, np_dtype, zero_bias)
  if score is not None:
    kernel = score["dense"]["kernel"]  # [E, 1]
    sources.append(_Source(
        "score.weight", (1, cfg.hidden_size), cfg.hidden_size * np_dtype.itemsize,
        lambda: np.ascontiguousarray(np.asarray(kernel).T, dtype=np_dtype)))
  if not allow_non_finite:
    sources = [_finite_only(source) for source in sources]

  tmp = export_temp_dir(out_dir)
  try:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(cfg, k) is not None}
    gen.update(generation_config or {})
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
      _save_tokenizer(tokenizer, tmp, cfg)
    _write_weights(tmp, sources, max_shard_bytes, np_dtype)
    _install(tmp, out_dir, overwrite)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
