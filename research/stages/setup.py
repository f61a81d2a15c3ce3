"""Pieces every stage wires the same way: mesh and rules from config, the model config, the
starting weights (random, a workdir or a Hugging Face directory), resume checks, and the loop."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from research.errors import ConfigError, UserError
from research.models import attention as attention_lib
from research.models.config import RUNTIME_FIELDS, ModelConfig
from research.stages.config_ranges import check_config_ranges
from research.parallel.mesh import make_mesh
from research.parallel.distributed import check_global_batch
from research.parallel.rules import DEFAULT_RULES, Rules, batch_shard_count
from research.train import workdir as wd
from research.train.checkpoints import Checkpointer
from research.train.curves import plot_curves
from research.train.metrics import METRICS_FILE, MetricsWriter, ProgressLogger, save_config
from research.train.state import TrainState, init_state, state_from_params
from research.train.loop import LoopHooks, train_loop

# True: continue the workdir's run (an error when it has none); "auto": continue it when there is
# one, else start fresh; False: start fresh (an error when the workdir holds a run).
Resume = bool | str


def rules_from(config: ConfigDict) -> Rules:
  """Default rules with `mesh.rules` entries replacing those of the same logical name."""
  overrides = {name: axes for name, axes in (config.mesh.get("rules") or ())}
  table = dict(DEFAULT_RULES)
  unknown = sorted(set(overrides) - set(table))
  if unknown:
    raise ConfigError(f"mesh.rules names unknown logical axes {unknown}; known: {sorted(table)}")
  table.update(overrides)
  return tuple(table.items())


def prepare_run(config: ConfigDict, workdir: str, resume: Resume) -> tuple[Mesh, Rules]:
  """What every stage checks first: the config's ranges, an attention this backend runs, the
  workdir (never clobbered), the mesh
  and its rules, and a global batch that splits over micro-batches, batch shards and processes."""
  check_config_ranges(config)
  model = config.get("model")
  if model is not None and "attention" in model:  # an attention this backend cannot run
    attention_lib.check_backend(model.attention, model.get("dtype", "float32"),
                                softcap=model.get("attn_logit_softcap"))
  os.makedirs(workdir, exist_ok=True)
  check_workdir(workdir, resume)
  mesh, rules = mesh_from(config), rules_from(config)
  check_global_batch(config.train.global_batch, config.train.micro_batches,
                     batch_shard_count(mesh, rules))
  return mesh, rules


def mesh_from(config: ConfigDict) -> Mesh:
  return make_mesh({k: config.mesh[k] for k in ("data", "fsdp", "tensor")})


def model_config_from(section: ConfigDict, vocab_size: int | None = None,
                      tokenizer: Any = None) -> ModelConfig:
  """ModelConfig from the `model` config section; vocab_size 0 takes the tokenizer's size."""
  fields = section.to_dict()
  if not fields.get("vocab_size"):
    if vocab_size is None:
      raise ConfigError("model.vocab_size is 0 (take it from the tokenizer) but no tokenizer is "
                        "known; set --config.model.vocab_size")
    fields["vocab_size"] = vocab_size
  if tokenizer is not None:
    fields.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id)
    if len(tokenizer) > fields["vocab_size"]:
      raise ConfigError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                        f"{len(tokenizer)} tokens; raise it or set it to 0 to follow the tokenizer")
  return ModelConfig.from_dict(fields)


def check_workdir(workdir: str, resume: Resume) -> None:
  """Refuses to train over an existing run unless resuming (nothing written is ever clobbered),
  and `resume=True` where there is nothing to resume; `resume="auto"` resumes or starts fresh."""
  ckpt_dir = wd.checkpoint_dir(workdir)
  has_steps = os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))
  metrics = os.path.join(workdir, METRICS_FILE)
  leftovers = os.path.isfile(metrics) and os.path.getsize(metrics) > 0
  if not resume and has_steps:
    raise UserError(f"{workdir} already holds checkpoints: pass --resume to continue that run, or "
                    "choose a new --workdir")
  if not resume and leftovers:
    raise UserError(f"{workdir} holds {METRICS_FILE} of an earlier run that saved no checkpoint: "
                    "pass --resume=auto to start over there (its metrics are replaced), or choose "
                    "a new --workdir")
  if resume is True and not has_steps:
    raise UserError(f"--resume: {workdir} holds no checkpoint to resume from; drop --resume to "
                    "start a new run there, or pass --resume=auto to resume when there is one")
  if resume == "auto" and not has_steps and jax.process_index() == 0:
    print(f"no checkpoint in {workdir}: starting fresh (--resume=auto)", flush=True)


def with_runtime_fields(cfg: ModelConfig, section: ConfigDict | None,
                        source: str = "") -> ModelConfig:
  """`cfg` with the runtime fields of the config's `model` section (when it has one); prints
  once what was applied, and which architecture fields of the section the checkpoint overrides."""
  if section is None:
    return cfg
  names = [n for n in RUNTIME_FIELDS if n in section and hasattr(cfg, n)]
  new = cfg.replace(**{n: section[n] for n in names})
  if jax.process_index() == 0 and names:
    applied = ", ".join(f"{n}={getattr(new, n)!r}" + (
        f" (checkpoint: {getattr(cfg, n)!r})" if getattr(new, n) != getattr(cfg, n) else "")
        for n in names)
    ignored = [f"{n}={section[n]!r} (checkpoint: {getattr(cfg, n)!r})" for n in section
               if n not in RUNTIME_FIELDS and hasattr(cfg, n) and n != "vocab_size"
               and section[n] is not None and section[n] != getattr(cfg, n)]
    print(f"init {source}: runtime from the config: {applied}", flush=True)
    if ignored:
      print(f"init {source}: the architecture comes from the checkpoint; ignored from the config: "
            + ", ".join(ignored), flush=True)
  return new


def load_init_weights(init: str, mesh: Mesh, rules: Rules, runtime: ConfigDict | None = None
                      ) -> tuple[ModelConfig, Any, str | None]:
  """(model config, params on `mesh`, tokenizer dir) from a workdir or a Hugging Face directory;
  `fetch:NAME` is the cached HF dir of a model that research.interop.model_zoo fetches.

  `runtime`, the config's `model` section if it has one, overrides RUNTIME_FIELDS; the params are
  cast to its `param_dtype`."""
  cfg, params, tok_dir = _load_init(init, mesh, rules)
  new = with_runtime_fields(cfg, runtime, init)
  if new.param_dtype != cfg.param_dtype:
    params = jax.tree.map(lambda x: x.astype(new.weight_dtype)
                          if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, params)
  return new, params, tok_dir


def _load_init(init: str, mesh: Mesh, rules: Rules) -> tuple[ModelConfig, Any, str | None]:
  from research.interop.model_zoo import resolve_init  # pylint: disable=import-outside-toplevel
  init = resolve_init(init)
  if not os.path.isdir(init):
    raise ConfigError(f"init={init!r} is not a directory: give a workdir of this project or a "
                      "Hugging Face model directory")
  if wd.is_workdir(init):
    cfg, params, tok_dir, _ = wd.load_model(init, mesh=mesh, rules=rules)
    return cfg, params, tok_dir
  # Imported here: the interop package pulls in safetensors/transformers only when needed.
  from research.interop import hf_config, hf_import  # pylint: disable=import-outside-toplevel
  config_path = os.path.join(init, "config.json")
  if not os.path.isfile(config_path):
    raise ConfigError(f"init={init!r} is neither a workdir ({wd.MODEL_CONFIG}) nor a Hugging Face "
                      "directory (config.json)")
  with open(config_path) as f:
    cfg = hf_config.model_config_from_hf(json.load(f))
  _, shardings = wd.param_shardings(cfg, mesh, rules)
  cfg, params = hf_import.load_hf_checkpoint(init, shardings=shardings)
  return cfg, params, init


def start_state(*, config: ConfigDict, workdir: str, resume: bool, abstract: TrainState,
                shardings: TrainState, init_fn, tx, init_params: Callable[[], tuple[Any, Any]] | None,
                checkpointer: Checkpointer) -> tuple[TrainState, int, dict]:
  """(state, step, checkpoint extra): resumed, built around given weights, or freshly initialised."""
  if resume and checkpointer.latest_step() is not None:
    step, (state, extra) = checkpointer.restore_newest(lambda s: checkpointer.restore(s, abstract))
    checkpointer.set_aside_newer(step)  # damaged steps: this run writes its own steps there
    if jax.process_index() == 0:
      print(f"resuming from step {step} of {checkpointer.directory}", flush=True)
    return state, int(jax.device_get(state.step)), extra
  if init_params is not None:
    params, frozen = init_params()
    return state_from_params(params, frozen, tx, shardings, config.seed), 0, {}
  return init_state(init_fn, tx, shardings, config.seed), 0, {}


def run_loop(*, config: ConfigDict, workdir: str, state: TrainState, start_step: int,
             hooks: LoopHooks, checkpointer: Checkpointer) -> TrainState:
  is_main = jax.process_index() == 0
  if is_main and hooks.after_eval is None:  # every stage's curves, redrawn at each eval
    hooks = dataclasses.replace(hooks, after_eval=lambda step: plot_curves(workdir))
  # A run from step 0 evaluates step 0 again: the old file's lines all go.
  writer = MetricsWriter(workdir, enabled=is_main, start_step=start_step or -1)
  progress = ProgressLogger(config.train.steps, every=config.train.log_every, enabled=is_main)
  try:
    return train_loop(state, hooks, start_step=start_step, total_steps=config.train.steps,
                      writer=writer, progress=progress, checkpointer=checkpointer,
                      checkpoint_every=config.train.checkpoint_every,
                      eval_every=config.train.eval_every,
                      stop_at_step=config.train.get("stop_at_step", 0),
                      max_bad_steps=config.train.get("max_bad_steps", 0))
  finally:
    writer.close()


def save_run_config(workdir: str, config: ConfigDict) -> None:
  if jax.process_index() == 0:
    save_config(workdir, config.to_dict())
