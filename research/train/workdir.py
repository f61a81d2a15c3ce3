"""The run directory layout, and loading a run's model (config, weights, tokenizer) out of it.

<workdir>/config.json          resolved run config
<workdir>/model_config.json    research.models.config.ModelConfig
<workdir>/tokenizer/           Hugging Face tokenizer files
<workdir>/checkpoints/<step>/  orbax checkpoints (state + JSON extra)
<workdir>/metrics.jsonl, tensorboard/, samples.txt
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from research.errors import CheckpointError
from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.models.heads import init_with_head
from research.models.peft import NO_PEFT, PeftConfig, merge_lora, split_trainable
from research.parallel.mesh import make_mesh
from research.parallel.rules import DEFAULT_RULES, Rules, logical_axes_of, shardings_for
from research.train.checkpoints import Checkpointer, UnrestorableCheckpoint
from research.train.metrics import read_config

MODEL_CONFIG = "model_config.json"
PEFT_CONFIG = "peft_config.json"
HEAD_CONFIG = "head.json"  # {"head": "score"} for a reward model
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
# Stages whose train state holds several models (policy, value, reference, reward): the key, in
# each state field, of the model that model_config.json describes.
MODEL_KEY = {"ppo": "policy"}


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def tokenizer_dir(workdir: str) -> str | None:
  path = os.path.join(workdir, TOKENIZER_DIR)
  return path if os.path.isdir(path) else None


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_CONFIG))


def _write_json(path: str, data: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def write_model_files(workdir: str, cfg: ModelConfig, tokenizer: Any = None,
                      peft: PeftConfig = NO_PEFT, head: str | None = None) -> None:
  """Model config (PEFT config, tokenizer) beside the checkpoints; process 0 only, atomically."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, MODEL_CONFIG), cfg.to_dict())
  if peft.method != "none":
    _write_json(os.path.join(workdir, PEFT_CONFIG), peft.to_dict())
  if head:
    _write_json(os.path.join(workdir, HEAD_CONFIG), {"head": head})
  if tokenizer is not None and not os.path.isdir(os.path.join(workdir, TOKENIZER_DIR)):
    tokenizer.save_pretrained(os.path.join(workdir, TOKENIZER_DIR))


def read_model_config(workdir: str) -> ModelConfig:
  path = os.path.join(workdir, MODEL_CONFIG)
  if not os.path.isfile(path):
    raise CheckpointError(f"{workdir} is not a run directory: {MODEL_CONFIG} is missing. Point to "
                          "a workdir written by experiments.* or scripts/convert.py from-hf")
  with open(path) as f:
    return ModelConfig.from_dict(json.load(f))


def read_peft_config(workdir: str) -> PeftConfig:
  path = os.path.join(workdir, PEFT_CONFIG)
  if not os.path.isfile(path):
    return NO_PEFT
  with open(path) as f:
    return PeftConfig(**json.load(f))


def read_head(workdir: str) -> str | None:
  """The scalar head the run's model carries (research.models.heads), or None for an LM."""
  path = os.path.join(workdir, HEAD_CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)["head"]


def model_key(workdir: str) -> str | None:
  """Where the run's model sits in its checkpointed state (MODEL_KEY by the run's stage), or None
  when the state's params are the model itself."""
  try:
    config = read_config(workdir)  # convert.py from-hf writes none: its params are the model
  except (OSError, ValueError):
    return None
  return MODEL_KEY.get(config.get("stage")) if isinstance(config, dict) else None


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    peft: PeftConfig = NO_PEFT, head: str | None = None):
  """(abstract params with shardings, shardings) of a decoder (+ head), from shapes only."""
  if head:
    boxed = jax.eval_shape(lambda: init_with_head(cfg, peft, head, jax.random.PRNGKey(0)))
  else:
    boxed = jax.eval_shape(lambda: Decoder(cfg, peft).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  shapes = nn.meta.unbox(boxed)
  shardings = shardings_for(shapes, logical_axes_of(boxed), mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def _merge_trees(a: Any, b: Any) -> Any:
  if not isinstance(a, dict) or not isinstance(b, dict):
    return a if b in (None, {}) else b
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge_trees(out[k], v) if k in out else v
  return out


def _lora_rank_mismatch(workdir: str, ckpt: Checkpointer, step: int | None, trainable: Any,
                        peft: PeftConfig, key: str | None = None) -> str | None:
  """Why a LoRA run failed to restore, when the cause is a rank other than peft_config.json's.

  Orbax's own message gives shapes but not which param; this names the param and both ranks.
  """
  if peft.method != "lora":
    return None
  step = ckpt.latest_step() if step is None else step
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(ckpt.directory, str(step), "state"))
    meta = getattr(meta, "item_metadata", meta)
    saved = getattr(meta, "tree", meta)["params"]
    saved = saved[key] if key else saved
  except Exception:  # pylint: disable=broad-except
    return None  # unreadable metadata: the restore error stands as it is
  for path, want in jax.tree_util.tree_flatten_with_path(trainable)[0]:
    keys = [k.key for k in path]
    if keys[-1] not in ("lora_a", "lora_b"):
      continue
    node = saved
    for k in keys:
      node = node.get(k) if isinstance(node, dict) else None
    shape = tuple(getattr(node, "shape", ()) or ())
    # A: [L?, in..., r] holds the rank last; B: [L?, r, out...] right after the layer axis.
    axis = -1 if keys[-1] == "lora_a" else int(keys[0] == "layers")
    if len(shape) == len(want.shape) and shape != tuple(want.shape) and shape[axis] != peft.r:
      return (f"{workdir}: LoRA param {'/'.join(keys)} has rank {shape[axis]} in checkpoint step "
              f"{step} but {PEFT_CONFIG} says r={peft.r}; set \"r\": {shape[axis]} in "
              f"{os.path.join(workdir, PEFT_CONFIG)}")
  return None


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None,
             rules: Rules = DEFAULT_RULES) -> tuple[ModelConfig, PeftConfig, Any, str | None, dict]:
  """(model config, PEFT config, every param incl. PEFT ones, tokenizer dir, checkpoint extra)."""
  cfg, peft = read_model_config(workdir), read_peft_config(workdir)
  if mesh is None:
    mesh = make_mesh({"data": -1})
  abstract, _ = param_shardings(cfg, mesh, rules, peft, read_head(workdir))
  trainable, frozen = split_trainable(abstract, peft)
  fields = {"params": trainable} if not frozen else {"params": trainable, "frozen": frozen}
  key = model_key(workdir)
  if key:  # only that model's leaves are read (partial restore)
    fields = {name: {key: tree} for name, tree in fields.items()}
  ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=1_000_000, async_save=False)

  def read(s: int):
    extra = ckpt.restore_extra(s)
    try:
      return extra, ckpt.restore_fields(s, fields)
    except UnrestorableCheckpoint:
      raise
    except CheckpointError as e:
      message = _lora_rank_mismatch(workdir, ckpt, s, trainable, peft, key)
      if message is None:
        raise
      raise CheckpointError(message) from e

  try:  # step None: the newest step that restores (a damaged newer one is named on stderr)
    _, (extra, restored) = ckpt.restore_newest(read, step)
  finally:
    ckpt.close()
  if key:
    restored = {name: tree[key] for name, tree in restored.items()}
  params = _merge_trees(restored.get("frozen", {}), restored["params"])
  return cfg, peft, params, tokenizer_dir(workdir), extra


def load_model(workdir: str, step: int | None = None, mesh: Mesh | None = None,
               rules: Rules = DEFAULT_RULES) -> tuple[ModelConfig, Any, str | None, dict]:
  """(model config, base decoder params on `mesh` with LoRA merged in, tokenizer dir, extra).

  Runs trained with prompt tuning or adapters have extra modules a plain decoder lacks: refused.
  """
  cfg, peft, params, tok_dir, extra = load_run(workdir, step, mesh, rules)
  if peft.method not in ("none", "lora"):
    raise CheckpointError(f"{workdir} was trained with peft.method={peft.method!r}, which cannot "
                          "be merged into the base weights; load it with load_run instead")
  if peft.method == "lora":
    params = jax.jit(lambda p: merge_lora(p, peft))(params)
  return cfg, params, tok_dir, extra


def write_initial_checkpoint(workdir: str, cfg: ModelConfig, params: Any,
                             tokenizer: Any = None, extra: dict | None = None) -> None:
  """A step-0 checkpoint holding only weights (e.g. imported from Hugging Face), usable as `init`."""
  write_model_files(workdir, cfg, tokenizer)
  ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=1, async_save=False)
  try:
    if ckpt.latest_step() is not None:
      raise CheckpointError(f"{checkpoint_dir(workdir)} already holds checkpoints; choose an empty "
                            "workdir")
    state = {"step": jnp.zeros((), jnp.int32), "params": params}
    ckpt.save(0, state, {"model_config": cfg.to_dict(), **(extra or {})}, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
