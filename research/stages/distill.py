"""Knowledge distillation: a frozen teacher (a workdir or HF directory) and a student (fresh from
`student.*`, or a checkpoint) sharing one tokenizer, trained on a corpus or SFT records with
forward KL, reverse KL or GKD's generalised JSD, optionally plus the LM loss. Off-policy on the
data's tokens; with `distill.lmbda` > 0 (SFT records), on-policy on that fraction of steps: the
responses are the student's own samples (research/stages/distill_onpolicy.py)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from research.data import loader
from research.data import sft as sft_data
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError
from research.models.config import ModelConfig
from research.models.decoder import Decoder, lm_head_kernel
from research.models.peft import PeftConfig, split_trainable
from research.objectives import distill as distill_math
from research.parallel import activations as act
from research.stages import distill_onpolicy as onpolicy
from research.stages import pretrain, setup
from research.stages.lm import loss_chunk_len, merge_params
from research.stages.sft import peft_from
from research.stages.training import StageSpec, host_slices, run_training
from research.train import workdir as wd

TEACHER = "teacher"  # frozen["teacher"]: the teacher's weights, never trained


def divergence_beta(settings: ConfigDict) -> float:
  if settings.divergence == "jsd":
    return float(settings.beta)
  if settings.divergence not in distill_math.DIVERGENCES:
    raise ConfigError(f"distill.divergence={settings.divergence!r} is not one of "
                      f"{sorted([*distill_math.DIVERGENCES, 'jsd'])}")
  return distill_math.DIVERGENCES[settings.divergence]


def check_settings(settings: ConfigDict, peft: PeftConfig) -> None:
  beta = divergence_beta(settings)
  if not 0.0 <= beta <= 1.0:
    raise ConfigError(f"distill.beta={settings.beta} must be in [0, 1] (GKD's JSD mixture weight "
                      "of the teacher)")
  if not settings.temperature > 0:
    raise ConfigError(f"distill.temperature={settings.temperature} must be positive")
  if settings.lm_weight < 0:
    raise ConfigError(f"distill.lm_weight={settings.lm_weight} must be >= 0 (the weight of the "
                      "student's plain LM loss beside the divergence)")
  if peft.method not in ("none", "lora"):
    raise ConfigError(f"the student trains fully or with LoRA; peft.method={peft.method!r}")


def distill_sums(student_cfg: ModelConfig, teacher_cfg: ModelConfig, peft: PeftConfig,
                 settings: ConfigDict, deterministic: bool):
  """(params, frozen, batch, rng) -> (divergence sum, student NLL sum, token count) over the
  masked positions of LM rows (inputs, targets, segment_ids, positions, loss_mask); the NLL over
  `lm_mask` where the batch has one (rows that may hold samples: the data's responses only)."""
  beta = divergence_beta(settings)

  def sums_fn(params, frozen, batch, rng):
    student = merge_params(params, {k: v for k, v in frozen.items() if k != TEACHER})
    teacher = frozen[TEACHER]
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    _, hidden_s = Decoder(student_cfg, peft, deterministic=deterministic).apply(
        {"params": student}, *args, compute_logits=False,
        rngs=None if deterministic else {"dropout": rng})
    _, hidden_t = Decoder(teacher_cfg).apply({"params": teacher}, *args, compute_logits=False)
    b, t = batch["inputs"].shape
    # Chunks of positions so neither model's [B, T, V] logits are ever whole.
    chunk = loss_chunk_len(student_cfg, b // max(1, act.batch_shards()), t)
    return distill_math.chunked_distill_sums(
        hidden_s, lm_head_kernel(student, student_cfg), hidden_t,
        lm_head_kernel(teacher, teacher_cfg), batch["targets"], batch["loss_mask"], chunk, beta,
        settings.temperature, student_softcap=student_cfg.final_logit_softcap,
        teacher_softcap=teacher_cfg.final_logit_softcap, nll_mask_bt=batch.get("lm_mask"))
  return sums_fn


def distill_loss_fn(sums_fn, lm_weight: float):
  """LossFn: divergence + lm_weight * NLL, per token."""
  def loss_fn(params, frozen, batch, rng):
    div, nll, count = sums_fn(params, frozen, batch, rng)
    per = jnp.maximum(count, 1.0)
    return div + lm_weight * nll, count, {"distill/divergence": div / per,
                                          "distill/lm_loss": nll / per}
  return loss_fn


def distill_evaluator(rows: dict, batch_size: int, max_batches: int, sums_fn, lm_weight: float):
  """EvaluatorFactory: held-out loss, divergence to the teacher and LM loss per token."""
  def make(_, sharding):
    if not len(rows["inputs"]):
      return None
    step = jax.jit(lambda state, batch: sums_fn(state.params, state.frozen, batch, None))
    device_batches = host_slices(loader.eval_batches(rows, batch_size)[:max_batches], sharding)

    def evaluate(state) -> dict[str, float]:
      div = nll = count = 0.0
      for batch in device_batches:
        d, n, c = (float(x) for x in jax.device_get(step(state, batch)))
        div, nll, count = div + d, nll + n, count + c
      per = max(count, 1.0)
      return {"eval/loss": (div + lm_weight * nll) / per, "eval/divergence": div / per,
              "eval/lm_loss": nll / per, "eval/tokens": count}

    return evaluate

  return make


def samples_responses(settings: ConfigDict) -> bool:
  """Whether some steps train on sampled responses (the student's, or with seq_kd the teacher's)."""
  return settings.lmbda > 0 or settings.seq_kd


def data_rows(config: ConfigDict, workdir: str, tokenizer) -> tuple[dict, dict]:
  """(train, eval) LM rows: a corpus packed whole, or SFT records masked to their responses;
  when steps sample responses, one SFT example per train row, with its prompt columns."""
  seq_len = config.data.seq_len
  if config.data.format == "corpus":
    texts = pretrain.corpus_texts(config, workdir)
    return loader.pretraining_rows(texts, tokenizer, seq_len, config.data.eval_fraction,
                                   config.seed)
  if config.data.format != "sft":
    raise ConfigError(f"data.format={config.data.format!r}: 'corpus' (data.corpus) or 'sft' "
                      "(data.path: alpaca or chat records)")
  paths = [p.strip() for p in config.data.path.split(",") if p.strip()]
  if not paths:
    raise ConfigError("data.format='sft' but data.path is empty: name the SFT records")
  records = sft_data.read_sft_records(paths)
  train, held_out = sft_data.split_records(records, config.data.eval_fraction, seed=config.seed)
  pad = tokenizer.pad_token_id

  sampled = samples_responses(config.distill)

  def rows(recs, with_prompts):
    examples, _ = sft_data.tokenize_sft(recs, tokenizer, seq_len, "truncate_prompt_left")
    out = sft_data.sft_rows(examples, seq_len, pad, not with_prompts)
    if with_prompts:
      width = seq_len + 1 - config.distill.max_new_tokens
      out.update(onpolicy.prompt_columns(examples, pad, width), lm_mask=out["loss_mask"].copy())
    return out
  return rows(train, sampled), rows(held_out, False)


def _same_vocab(teacher: Any, student: Any, where: str) -> None:
  if teacher.get_vocab() != student.get_vocab():
    raise ConfigError(f"the student's tokenizer ({where}) differs from the teacher's: "
                      "distillation compares their distributions token by token, so both must "
                      "share one tokenizer")


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  mesh, rules = setup.prepare_run(config, workdir, resume)
  peft = peft_from(config.peft)
  settings = config.distill
  check_settings(settings, peft)
  onpolicy.check_sampling(settings, config.data)
  if not config.teacher:
    raise ConfigError("teacher is empty: name the teacher's workdir or Hugging Face directory "
                      "(--config.teacher=DIR)")
  teacher_cfg, teacher_params, teacher_tok = setup.load_init_weights(config.teacher, mesh, rules)
  if not teacher_tok:
    raise ConfigError(f"teacher={config.teacher!r} has no tokenizer files beside its weights")
  tokenizer = tokenizer_lib.load_tokenizer(teacher_tok)

  resuming = resume and wd.is_workdir(workdir)
  student_params = None
  if resuming:
    student_cfg = wd.read_model_config(workdir)
  elif config.init:
    student_cfg, student_params, student_tok = setup.load_init_weights(
        config.init, mesh, rules, config.get("model"))
    _same_vocab(tokenizer, tokenizer_lib.load_tokenizer(student_tok or config.init), config.init)
  else:
    student_cfg = setup.model_config_from(config.student, teacher_cfg.vocab_size, tokenizer)
  if student_cfg.vocab_size != teacher_cfg.vocab_size:
    raise ConfigError(f"the student's vocabulary ({student_cfg.vocab_size}) differs from the "
                      f"teacher's ({teacher_cfg.vocab_size}); set student.vocab_size=0 to take "
                      "the teacher's")
  train_rows, eval_rows = data_rows(config, workdir, tokenizer)
  print(f"distill data: {len(train_rows['inputs'])} train rows, {len(eval_rows['inputs'])} "
        f"held-out rows of {config.data.seq_len} tokens", flush=True)
  wd.write_model_files(workdir, student_cfg, tokenizer, peft)
  setup.save_run_config(workdir, config)

  def init_fn(rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    trainable, frozen = split_trainable(
        Decoder(student_cfg, peft).init(rng, tokens)["params"], peft)
    return trainable, {**frozen, TEACHER: Decoder(teacher_cfg).init(rng, tokens)["params"]}

  # Fresh student: only the teacher's weights replace the init; a checkpoint student: both. A
  # resumed run restores its checkpoint instead (and one that never saved starts from these).
  base = {**(student_params or {}), TEACHER: teacher_params}
  sums = lambda det: distill_sums(student_cfg, teacher_cfg, peft, settings, det)  # noqa: E731
  wrap_step = None
  if samples_responses(settings):
    student = onpolicy.Sampler(
        params=lambda st: merge_params(st.params, {k: v for k, v in st.frozen.items()
                                                   if k != TEACHER}),
        cfg=student_cfg, peft=peft)
    teacher = onpolicy.Sampler(params=lambda st: st.frozen[TEACHER], cfg=teacher_cfg)
    schedule_s = onpolicy.on_policy_schedule(config.seed, config.train.steps, settings.lmbda)
    sampling = onpolicy.sampling_config(settings, tokenizer.eos_token_id)
    wrap_step = lambda step, sharding: onpolicy.make_host_step(  # noqa: E731
        step, sharding, schedule_s, student, teacher if settings.seq_kd else None, sampling,
        tokenizer.pad_token_id)
  spec = StageSpec(
      init_fn=init_fn, train_loss=distill_loss_fn(sums(False), settings.lm_weight),
      eval_loss=distill_loss_fn(sums(True), settings.lm_weight), train_rows=train_rows,
      tokens_per_row=train_rows["inputs"].shape[1], base_params=base,
      make_evaluator=distill_evaluator(eval_rows, config.train.eval_batch_size,
                                       config.train.max_eval_batches, sums(True),
                                       settings.lm_weight),
      meta={"model_config": student_cfg.to_dict(), "peft_config": peft.to_dict(),
            "teacher": os.path.abspath(config.teacher)},
      lm_loss=False, wrap_step=wrap_step)
  state, last_eval = run_training(config, workdir, resume, spec, mesh=mesh, rules=rules)
  return {"state": state, "eval": last_eval, "model_config": student_cfg,
          "teacher_config": teacher_cfg}
