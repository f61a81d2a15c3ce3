"""Write a LoRA run as a Hugging Face PEFT adapter dir (adapter_config.json and
adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto its exported base."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import save_file

from research.errors import CheckpointError, ConfigError
from research.interop.hf_config import model_config_from_hf
from research.interop.hf_export import EXPORT_DTYPES, _install, export_hf, export_temp_dir
from research.interop.hf_import import TensorSpec, _open_all, _weight_files, tensor_layout
from research.models.config import ModelConfig
from research.models.peft import LORA_TARGETS, PeftConfig, strip_peft

Params = dict[str, Any]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_SUBDIR = "base"
# PEFT's prefix for a causal LM: PeftModel.base_model (LoraModel) .model (XForCausalLM).
PEFT_PREFIX = "base_model.model."
# The shape-defining fields a referenced base must share with the run's model config.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "resolved_head_dim", "mlp_dim", "tie_embeddings")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """One adapted projection: our `<name>_lora` module and the HF Linear it wraps.

  `in_shape` / `out_shape` are our multi-axis feature dims (per layer); HF flattens each in C
  order, exactly as the base kernel's `to_hf_layout` does, so delta = B @ A lines up with it.
  """
  target: str
  path: tuple[str, ...]  # ("layers", "attn", "q_lora") in the scanned layout
  hf_module: str  # "model.layers.{i}.self_attn.q_proj"
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  def a_shape(self, r: int) -> tuple[int, ...]:
    return (*self.in_shape, r)

  def b_shape(self, r: int) -> tuple[int, ...]:
    return (r, *self.out_shape)


def lora_layout(cfg: ModelConfig, peft: PeftConfig) -> list[LoraSpec]:
  """The adapted projections in LORA_TARGETS order, derived from the base export's tensor table."""
  by_target = {}
  for spec in tensor_layout(cfg, attention_bias=False):
    module, leaf = spec.path[-2], spec.path[-1]
    if leaf == "kernel" and module in LORA_TARGETS:
      by_target[module] = spec
  out = []
  for target in LORA_TARGETS:
    if not peft.lora_on(target):
      continue
    spec: TensorSpec = by_target[target]
    # heads_out ([H, D, E] -> [E, H*D]) has two input axes; every other kernel has one.
    num_in = 2 if spec.kind == "heads_out" else 1
    in_shape, out_shape = spec.shape[:num_in], spec.shape[num_in:]
    if spec.hf_shape != (math.prod(out_shape), math.prod(in_shape)):
      raise AssertionError(f"{spec.hf_name}: HF shape {spec.hf_shape} is not [out, in] of "
                           f"{spec.shape}")  # the HF table changed: this mapping must follow it
    hf_module = spec.hf_name.removesuffix(".weight")
    out.append(LoraSpec(target, spec.path[:-2] + (f"{target}_lora",), hf_module, in_shape,
                        out_shape))
  return out


def hf_target_modules(peft: PeftConfig) -> list[str]:
  """PEFT's `target_modules`: q_proj, ..., down_proj for our q, ..., down."""
  return [f"{t}_proj" for t in LORA_TARGETS if peft.lora_on(t)]


def _leaf(params: Params, path: tuple[str, ...], layer: int | None) -> Any:
  """`path` in scanned params, or in `layers_<layer>` of unrolled ones."""
  tree: Any = params
  if "layers" not in params and path[0] == "layers":
    tree, path = params.get(f"layers_{layer}"), path[1:]
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise CheckpointError(f"params have no {'/'.join(path)}: the run's LoRA params do not "
                            f"match its peft_config.json (targets)")
    tree = tree[key]
  return tree


def _check_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...], rank_axis: int,
                 peft: PeftConfig) -> None:
  """Names the tensor and both ranks when only the rank differs (r edited, or another run's)."""
  if shape == want:
    return
  drop = lambda s: s[:rank_axis] + s[rank_axis + 1:]  # noqa: E731
  if len(shape) == len(want) and drop(shape) == drop(want):
    raise CheckpointError(f"LoRA param {name} has rank {shape[rank_axis]} but the PEFT config "
                          f"(peft_config.json) says r={peft.r}; set r={shape[rank_axis]} there, "
                          f"or export the run whose adapter this is")
  raise CheckpointError(f"LoRA param {name} has shape {list(shape)}, expected {list(want)} from "
                        f"the model config and r={peft.r}")


def lora_tensors(params: Params, cfg: ModelConfig, peft: PeftConfig,
                 np_dtype: np.dtype = np.dtype(np.float32)) -> dict[str, np.ndarray]:
  """PEFT's adapter tensors (names as `PeftModel.save_pretrained` writes them) from our params.

  lora_A.weight is [r, in] = A[in..., r] flattened and transposed; lora_B.weight is [out, r].
  Every shape is checked (rank included) before anything is converted.
  """
  if peft.method != "lora":
    raise ConfigError(f"peft.method={peft.method!r}: only LoRA adapters export to PEFT")
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  specs = lora_layout(cfg, peft)
  scanned = "layers" in params
  r, num_layers = peft.r, cfg.num_layers
  for spec in specs:  # shapes first, so a mismatch fails before any conversion
    for leaf_name, want, rank_axis in (("lora_a", spec.a_shape(r), len(spec.in_shape)),
                                       ("lora_b", spec.b_shape(r), 0)):
      for i in [None] if scanned else range(num_layers):
        shape = tuple(_leaf(params, spec.path + (leaf_name,), i).shape)
        path = spec.path if scanned else (f"layers_{i}",) + spec.path[1:]
        _check_shape("/".join(path + (leaf_name,)), shape,
                     (num_layers, *want) if scanned else want, rank_axis + int(scanned), peft)
  out = {}
  for spec in specs:
    for i in range(num_layers):
      a = _leaf(params, spec.path + ("lora_a",), i)
      b = _leaf(params, spec.path + ("lora_b",), i)
      if scanned:
        a, b = a[i], b[i]
      a = np.asarray(jax.device_get(a))
      b = np.asarray(jax.device_get(b))
      name = PEFT_PREFIX + spec.hf_module.format(i=i)
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T, dtype=np_dtype)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T, dtype=np_dtype)
  return out


def adapter_config(peft: PeftConfig, base_model_name_or_path: str) -> dict[str, Any]:
  """adapter_config.json: the LoraConfig fields that define the function, PEFT's names."""
  alpha = int(peft.alpha) if float(peft.alpha).is_integer() else float(peft.alpha)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "inference_mode": True,
      "r": peft.r,
      "lora_alpha": alpha,
      "lora_dropout": peft.dropout,
      "target_modules": hf_target_modules(peft),
      "use_rslora": peft.rslora,
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "use_dora": False,
  }


def _check_existing_base(base_dir: pathlib.Path, params: Params, cfg: ModelConfig) -> None:
  """A base named with --base-dir must be this run's base: same shapes, same weights (sampled)."""
  config_path = base_dir / "config.json"
  if not config_path.is_file():
    raise CheckpointError(f"--base-dir {base_dir} exists but holds no config.json: give an "
                          f"exported base (scripts/convert.py to-hf / to-peft) or a new path")
  try:
    base_cfg = model_config_from_hf(json.loads(config_path.read_text()))
  except ValueError as e:
    raise CheckpointError(f"--base-dir {base_dir}: cannot read its config.json: {e}") from e
  for field in _SHAPE_FIELDS:
    ours, theirs = getattr(cfg, field), getattr(base_cfg, field)
    if ours != theirs:
      raise CheckpointError(f"--base-dir {base_dir} is another model: its {field} is {theirs}, "
                            f"the run's is {ours}; omit --base-dir to export the run's own base")
  # Norm scales are small and differ between any two trained models: a cheap identity check.
  checks = {"model.norm.weight": ("final_norm", "scale"),
            f"model.layers.{cfg.num_layers - 1}.input_layernorm.weight":
                ("layers", "attn_norm", "scale")}
  with _open_all(_weight_files(base_dir)) as by_name:
    for name, path in checks.items():
      if name not in by_name:
        raise CheckpointError(f"--base-dir {base_dir} has no tensor {name}; it is not an HF "
                              "checkpoint of this model")
      theirs = by_name[name].get_tensor(name)
      last = cfg.num_layers - 1
      ours = _leaf(params, path, last)
      if path[0] == "layers" and "layers" in params:
        ours = ours[last]
      ours = np.asarray(jax.device_get(ours)).astype(theirs.dtype)
      if not np.array_equal(ours, theirs):
        raise CheckpointError(f"--base-dir {base_dir} is not this run's frozen base: its {name} "
                              f"differs from the run's; omit --base-dir to export the run's own "
                              f"base")


def export_peft(params: Params, cfg: ModelConfig, peft: PeftConfig, out_dir: str | pathlib.Path,
                *, base_dir: str | pathlib.Path | None = None, architecture: str | None = None,
                dtype: str = "float32", tokenizer: Any = None, overwrite: bool = False
                ) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes a PEFT LoRA adapter dir and (unless `base_dir` is an existing export) its base.

  `params`: every param of a LoRA run (base + `<name>_lora`, e.g. `load_run`'s), scanned or not.
  `base_dir`: None puts the base in `out_dir/base`; a missing path gets the base exported there;
  an existing one must be an export of this run's base and is only referenced. The adapter is
  built in a temp dir and moved into place once complete. Returns (out_dir, base_dir).
  """
  if dtype not in EXPORT_DTYPES:
    raise ConfigError(f"export dtype={dtype!r}; choose one of {EXPORT_DTYPES}")
  out_dir = pathlib.Path(out_dir).absolute()
  if out_dir.exists() and not overwrite:
    raise CheckpointError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to "
                          f"replace it")
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  # Converting checks every LoRA shape and rank before anything is written.
  tensors = lora_tensors(params, cfg, peft, np_dtype)
  base = strip_peft(params)
  inside = base_dir is None
  base_path = out_dir / BASE_SUBDIR if inside else pathlib.Path(base_dir).absolute()
  if not inside:
    if base_path == out_dir or out_dir in base_path.parents:
      raise ConfigError(f"--base-dir {base_path} lies inside OUT_DIR {out_dir}, which is replaced "
                        f"as a whole; omit --base-dir for OUT_DIR/{BASE_SUBDIR}")
    if base_path.exists():
      _check_existing_base(base_path, base, cfg)
    else:
      export_hf(base, cfg, base_path, architecture=architecture, dtype=dtype, tokenizer=tokenizer)

  tmp = export_temp_dir(out_dir)
  try:
    if inside:
      export_hf(base, cfg, tmp / BASE_SUBDIR, architecture=architecture, dtype=dtype,
                tokenizer=tokenizer)
    config = adapter_config(peft, str(base_path))
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    _install(tmp, out_dir, overwrite)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir, base_path

