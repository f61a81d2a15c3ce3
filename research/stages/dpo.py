"""DPO and its family (IPO, hinge, cDPO, SimPO, ORPO) on preference rows: the policy's log-probs
of every completion of a prompt from one forward pass, against a reference that is precomputed
once and kept with the data, the base with the LoRA adapter off, or a frozen copy."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from research.data import loader
from research.data import preferences as pref_data
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError, DataError
from research.models.config import ModelConfig
from research.models.decoder import Decoder, lm_head_kernel
from research.models.peft import NO_PEFT, PeftConfig, split_trainable, strip_peft
from research.objectives import dpo as dpo_math
from research.parallel import activations as act
from research.parallel.rules import Rules, batch_sharding
from research.stages import setup
from research.stages.base_model import build_base
from research.stages.lm import loss_chunk_len, merge_params
from research.stages.sft import peft_from
from research.stages.training import StageSpec, host_slices, run_training
from research.train import workdir as wd

BATCH_KEYS = ("tokens_bkt", "segment_ids_bkt", "positions_bkt", "response_mask_bkt", "valid_bk")
REF_KEY = "ref_logps_bk"  # the precomputed reference's summed log-probs, a column of the rows
REFERENCE_COPY = "reference"  # frozen["reference"]: a full fine-tune's live frozen reference
REFERENCE_FILE = "reference_logps.npz"  # the precomputed reference, kept for --resume


def completion_logps(params, cfg: ModelConfig, peft: PeftConfig, batch, *, deterministic=True,
                     rng=None) -> tuple[jax.Array, jax.Array]:
  """([B, K] summed log-probs of each completion's response tokens, [B, K] their counts): every
  completion of every prompt in one forward pass of B*K rows; prompt tokens never count."""
  b, k, t = batch["tokens_bkt"].shape
  flat = lambda x: x.reshape(b * k, t)  # noqa: E731
  tokens_nt = flat(batch["tokens_bkt"])
  _, hidden_nte = Decoder(cfg, peft, deterministic=deterministic).apply(
      {"params": params}, tokens_nt, flat(batch["segment_ids_bkt"]),
      flat(batch["positions_bkt"]), compute_logits=False,
      rngs=None if deterministic else {"dropout": rng})
  targets_nt, mask_nt = dpo_math.next_token_targets(tokens_nt, flat(batch["response_mask_bkt"]))
  # The head runs over chunks of positions: [rows, chunk, vocab] logits live, never [rows, T, V].
  chunk = loss_chunk_len(cfg, b * k // max(1, act.batch_shards()), t)
  logps_n = dpo_math.chunked_sequence_logps(hidden_nte, lm_head_kernel(params, cfg), targets_nt,
                                            mask_nt, chunk, cfg.final_logit_softcap)
  return logps_n.reshape(b, k), jnp.sum(mask_nt, axis=-1).reshape(b, k)


def reference_kind(loss: str, peft: PeftConfig, precompute: bool) -> str:
  """none (reference-free loss), precomputed, adapter_off (LoRA's base) or copy (a frozen copy)."""
  if loss in dpo_math.REFERENCE_FREE:
    return "none"
  if precompute:
    return "precomputed"
  return "adapter_off" if peft.method == "lora" else "copy"


def policy_params(params, frozen) -> Any:
  return merge_params(params, {k: v for k, v in frozen.items() if k != REFERENCE_COPY})


def dpo_pair_sums(cfg: ModelConfig, peft: PeftConfig, settings: ConfigDict, kind: str,
                  deterministic: bool):
  """(params, frozen, batch, rng) -> (sum of pair losses, pair count, metric sums)."""
  def sums_fn(params, frozen, batch, rng):
    logps_bk, counts_bk = completion_logps(policy_params(params, frozen), cfg, peft, batch,
                                           deterministic=deterministic, rng=rng)
    ref_bk = None
    if kind == "precomputed":
      ref_bk = batch[REF_KEY]
    elif kind == "adapter_off":  # LoRA: the frozen base alone, no second copy in memory
      ref_bk, _ = completion_logps(strip_peft(frozen), cfg, NO_PEFT, batch)
    elif kind == "copy":
      ref_bk, _ = completion_logps(frozen[REFERENCE_COPY], cfg, NO_PEFT, batch)
    if ref_bk is not None:
      ref_bk = jax.lax.stop_gradient(ref_bk)
    return dpo_math.preference_losses(
        logps_bk, counts_bk, batch["valid_bk"], ref_bk, loss_type=settings.loss,
        beta=settings.beta, label_smoothing=settings.label_smoothing, gamma=settings.gamma)
  return sums_fn


def dpo_loss_fn(cfg: ModelConfig, peft: PeftConfig, settings: ConfigDict, kind: str,
                deterministic: bool):
  """The stage's LossFn: aux holds the TRL-named metrics as means over the batch's pairs."""
  sums_fn = dpo_pair_sums(cfg, peft, settings, kind, deterministic)

  def loss_fn(params, frozen, batch, rng):
    num, den, sums = sums_fn(params, frozen, batch, rng)
    return num, den, {k: v / jnp.maximum(den, 1.0) for k, v in sums.items()}
  return loss_fn


def dpo_evaluator(rows: dict, batch_size: int, max_batches: int, sums_fn):
  """EvaluatorFactory: held-out loss and the TRL metrics, as `eval/<name>`, over all pairs."""
  def make(_, sharding):
    if not len(rows["tokens_bkt"]):
      return None
    step = jax.jit(lambda state, batch: sums_fn(state.params, state.frozen, batch, None))
    device_batches = host_slices(loader.eval_batches(rows, batch_size)[:max_batches], sharding)

    def evaluate(state) -> dict[str, float]:
      total: dict[str, float] = {}
      for batch in device_batches:
        num, den, sums = jax.device_get(step(state, batch))
        for key, value in {"loss": num, "pairs": den, **sums}.items():
          total[key] = total.get(key, 0.0) + float(value)
      pairs = max(total["pairs"], 1.0)
      return {f"eval/{k}": (v if k == "pairs" else v / pairs) for k, v in total.items()}

    return evaluate

  return make


def reference_logps(params, cfg: ModelConfig, rows: dict, batch_size: int, mesh: Mesh,
                    rules: Rules) -> np.ndarray:
  """[N, K] summed log-probs of every completion of `rows` under `params` (the reference), in
  fixed batches sharded over the mesh like a train batch."""
  n = len(rows["tokens_bkt"])
  if not n:
    return np.zeros(rows["valid_bk"].shape, np.float32)
  sharding = batch_sharding(mesh, rules)

  def logps(p, batch):
    with act.activation_sharding(mesh, rules):
      return completion_logps(p, cfg, NO_PEFT, batch)[0]

  run = jax.jit(logps, out_shardings=NamedSharding(mesh, PartitionSpec()))
  batches = host_slices(loader.eval_batches({k: rows[k] for k in BATCH_KEYS}, batch_size),
                        sharding)
  out = np.concatenate([np.asarray(jax.device_get(run(params, b))) for b in batches])
  return out[:n].astype(np.float32)


def _precomputed_reference(workdir: str, resuming: bool, compute) -> dict[str, np.ndarray]:
  """{"train": [N, K], "eval": [M, K]}: computed once (`compute()`) and saved in the workdir, so a
  resumed run reads the same numbers instead of needing the reference weights again."""
  path = os.path.join(workdir, REFERENCE_FILE)
  if resuming:
    if not os.path.isfile(path):
      raise ConfigError(f"{path} is missing: a run with dpo.precompute_reference resumes from the "
                        "reference log-probs it saved; start a new --workdir")
    with np.load(path) as f:
      return {"train": f["train"], "eval": f["eval"]}
  refs = compute()
  if jax.process_index() == 0:
    np.savez(path + ".tmp.npz", **refs)
    os.replace(path + ".tmp.npz", path)
  return refs


def check_settings(settings: ConfigDict, peft: PeftConfig) -> None:
  if settings.loss not in dpo_math.LOSS_TYPES:
    raise ConfigError(f"dpo.loss={settings.loss!r} is not one of {dpo_math.LOSS_TYPES}; set "
                      "--config.dpo.loss")
  if not settings.beta > 0:
    raise ConfigError(f"dpo.beta={settings.beta} must be positive (DPO's KL strength; SimPO's "
                      "reward scale; ORPO's odds-ratio weight)")
  if not 0.0 <= settings.label_smoothing < 0.5:
    raise ConfigError(f"dpo.label_smoothing={settings.label_smoothing} must be in [0, 0.5): the "
                      "probability that a pair's label is flipped (conservative DPO)")
  if settings.label_smoothing and settings.loss not in ("sigmoid", "simpo"):
    raise ConfigError(f"dpo.label_smoothing applies to the sigmoid and simpo losses, not "
                      f"dpo.loss={settings.loss!r}; set it to 0")
  if peft.method not in ("none", "lora"):
    raise ConfigError(f"DPO trains fully or with LoRA; peft.method={peft.method!r}")


def _has_checkpoint(workdir: str) -> bool:
  ckpt_dir = wd.checkpoint_dir(workdir)
  return os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))


def all_response_texts(records: list[dict]) -> list[str]:
  """Every completion with its prompt: a base built from these prefers none of them."""
  return [r["prompt"] + response for r in records for response in r["responses"]]


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  mesh, rules = setup.prepare_run(config, workdir, resume)
  peft = peft_from(config.peft)
  settings = config.dpo
  check_settings(settings, peft)
  kind = reference_kind(settings.loss, peft, settings.precompute_reference)
  train_records, eval_records = pref_data.read_preference_splits(
      config.data.path, config.data.eval_count, config.seed, config.data.get("eval_fold", 0))

  resuming = resume and _has_checkpoint(workdir)
  base_params = None
  if resuming:
    cfg, tok_dir = wd.read_model_config(workdir), wd.tokenizer_dir(workdir)
  else:
    init = config.init or build_base(config.base, config.mesh, workdir,
                                     all_response_texts(train_records))
    cfg, base_params, tok_dir = setup.load_init_weights(init, mesh, rules, config.get("model"))
  if not tok_dir:
    raise ConfigError(f"init={config.init!r} has no tokenizer files beside its weights")
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  if config.data.get("chat_template", False):
    train_records = pref_data.chat_records(train_records, tokenizer)
    eval_records = pref_data.chat_records(eval_records, tokenizer)
  tokenize = lambda recs: pref_data.tokenize_preferences(  # noqa: E731
      recs, tokenizer, config.data.max_len, config.data.long_prompts)
  train_rows, report = tokenize(train_records)
  eval_rows = tokenize(eval_records)[0] if eval_records else {
      k: np.zeros((0, 2, config.data.max_len) if k.endswith("bkt") else (0, 2), np.float32)
      for k in BATCH_KEYS}
  print(f"dpo data: {report}", flush=True)
  train_rows = {k: train_rows[k] for k in BATCH_KEYS}
  eval_rows = {k: eval_rows[k] for k in BATCH_KEYS}
  if kind == "precomputed":
    def compute():
      # Minutes on a CPU for a real model: say so before, and how long it took after.
      print(f"dpo reference: log-probs of {len(train_rows['tokens_bkt'])} train and "
            f"{len(eval_rows['tokens_bkt'])} held-out records under the initial model...",
            flush=True)
      start, batch = time.perf_counter(), config.train.eval_batch_size
      refs = {"train": reference_logps(base_params, cfg, train_rows, batch, mesh, rules),
              "eval": reference_logps(base_params, cfg, eval_rows, batch, mesh, rules)}
      print(f"dpo reference: done in {time.perf_counter() - start:.0f} s", flush=True)
      return refs
    refs = _precomputed_reference(workdir, resuming, compute)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
      if refs[name].shape != rows["valid_bk"].shape:
        raise DataError(f"{os.path.join(workdir, REFERENCE_FILE)}: {name} reference log-probs "
                        f"have shape {refs[name].shape}, the data {rows['valid_bk'].shape}: the "
                        "data or data.* changed since the run started; resume with the same "
                        "data or start a new --workdir")
      rows[REF_KEY] = refs[name]
  wd.write_model_files(workdir, cfg, tokenizer, peft)
  setup.save_run_config(workdir, config)

  def init_fn(rng):
    model = Decoder(cfg, peft)
    trainable, frozen = split_trainable(
        model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"], peft)
    if kind == "copy":
      frozen = {REFERENCE_COPY: Decoder(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]}
    return trainable, frozen

  base = base_params
  if base_params is not None and kind == "copy":
    base = {**base_params, REFERENCE_COPY: base_params}
  spec = StageSpec(
      init_fn=init_fn,
      train_loss=dpo_loss_fn(cfg, peft, settings, kind, deterministic=False),
      eval_loss=dpo_loss_fn(cfg, peft, settings, kind, deterministic=True),
      train_rows=train_rows, tokens_per_row=int(np.prod(train_rows["tokens_bkt"].shape[1:])),
      base_params=base,
      make_evaluator=dpo_evaluator(eval_rows, config.train.eval_batch_size,
                                   config.train.max_eval_batches,
                                   dpo_pair_sums(cfg, peft, settings, kind, deterministic=True)),
      meta={"model_config": cfg.to_dict(), "peft_config": peft.to_dict()},
      lm_loss=False)
  state, last_eval = run_training(config, workdir, resume, spec, mesh=mesh, rules=rules)
  return {"state": state, "eval": last_eval, "model_config": cfg, "reference": kind,
          "report": str(report)}
