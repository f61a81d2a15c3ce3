"""On-policy distillation (GKD, Agarwal et al. 2024, arXiv:2306.13649; TRL's GKDTrainer `lmbda`
and `seq_kd`): on a fraction `lmbda` of the steps the batch's responses are replaced by the
student's own samples from the batch's prompts, drawn with the compiled sampler between jitted
updates; the divergence then covers the generated tokens only, up to and including the stop
token. With `seq_kd`, the other steps' responses are the teacher's samples instead of the data's.

Rows: every SFT example is a row of its own (never packed) that carries, beside its LM columns and
`lm_mask` (where `lm_weight`'s NLL applies: the data's responses, never a sample, which the
student would only be taught to repeat), its prompt left-padded (or cut from the left) to P = seq_len + 1 - max_new_tokens tokens, so a
prompt and its sample make exactly a row's seq_len + 1 tokens: sampled and data rows have one
shape, and both feed the one compiled train step.

Which steps sample, and with which key, is a fixed function of (seed, step): a stopped and resumed
run samples where, and what, the straight run sampled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from research.data.sft import Example
from research.errors import ConfigError, DataError
from research.models.config import ModelConfig
from research.models.decoder import default_positions
from research.models.peft import NO_PEFT, PeftConfig
from research.sampling import SamplingConfig, generate_tokens, left_pad
from research.train.state import TrainState

# Salts: the step schedule's numpy stream, and the sampling key (kept apart from the train step's
# own `fold_in(state.rng, step)`, which feeds dropout).
_SCHEDULE_SALT = 0x6B64
_SAMPLE_SALT = 0x6B65


def check_sampling(settings: ConfigDict, data: ConfigDict) -> None:
  """On-policy settings against the data they sample from; one ConfigError naming the field."""
  lmbda, n = settings.lmbda, settings.max_new_tokens
  if not 0.0 <= lmbda <= 1.0:
    raise ConfigError(f"distill.lmbda={lmbda} must be in [0, 1] (the fraction of steps whose "
                      "responses are the student's own samples)")
  if not (lmbda > 0 or settings.seq_kd):
    return
  if data.format != "sft":
    raise ConfigError(f"distill.lmbda={lmbda} (or seq_kd) needs prompts to sample from: set "
                      f"data.format='sft' (prompt + response records); data.format="
                      f"{data.format!r} has none")
  if not 1 <= n < data.seq_len:
    raise ConfigError(f"distill.max_new_tokens={n} must be in [1, data.seq_len={data.seq_len}): "
                      "a prompt and its sample share one row of seq_len + 1 tokens")
  if settings.sample_temperature < 0:
    raise ConfigError(f"distill.sample_temperature={settings.sample_temperature} must be >= 0 "
                      "(0: greedy)")
  if not 0.0 < settings.top_p <= 1.0:
    raise ConfigError(f"distill.top_p={settings.top_p} must be in (0, 1] (1: off)")
  if settings.top_k < 0:
    raise ConfigError(f"distill.top_k={settings.top_k} must be >= 0 (0: off)")


def sampling_config(settings: ConfigDict, eos_id: int) -> SamplingConfig:
  return SamplingConfig(max_new_tokens=settings.max_new_tokens,
                        temperature=settings.sample_temperature, top_k=settings.top_k,
                        top_p=settings.top_p, stop_tokens=(eos_id,))


def on_policy_schedule(seed: int, total_steps: int, lmbda: float) -> np.ndarray:
  """bool [total_steps]: entry k says whether step k + 1 samples from the student, each with
  probability `lmbda` (exactly never at 0, always at 1). A prefix of one numpy stream, so it does
  not depend on `total_steps` beyond its length."""
  if lmbda <= 0.0:
    return np.zeros(total_steps, bool)
  if lmbda >= 1.0:
    return np.ones(total_steps, bool)
  return np.random.default_rng([seed, _SCHEDULE_SALT]).random(total_steps) < lmbda


def response_start(loss_on: np.ndarray) -> int:
  """Index of the first token of the example's last response (its last run of loss flags)."""
  on = np.flatnonzero(loss_on)
  before = np.flatnonzero(~loss_on[:on[-1]])
  return int(before[-1]) + 1 if len(before) else 0


def prompt_columns(examples: Sequence[Example], pad_id: int, width: int) -> dict[str, np.ndarray]:
  """`prompt_tokens` and `prompt_segments` [n, width]: each example's tokens before its last
  response, left-padded, or cut from the left (the end, where the response opens, is kept)."""
  prompts = []
  for i, (ids, loss_on) in enumerate(examples):
    start = response_start(loss_on)
    if start == 0:
      raise DataError(f"SFT example {i} has no prompt before its response: on-policy "
                      "distillation samples responses from prompts")
    prompts.append(ids[:start][-width:])
  tokens, segments = left_pad(prompts, pad_id)
  pad = width - tokens.shape[1]  # every prompt shorter than width: pad the rest on the left
  return {"prompt_tokens": np.pad(tokens, ((0, 0), (pad, 0)), constant_values=pad_id),
          "prompt_segments": np.pad(segments, ((0, 0), (pad, 0)))}


def sampled_rows(prompt_bp: jax.Array, prompt_seg_bp: jax.Array, resp_bn: jax.Array,
                 lengths_b: jax.Array) -> dict[str, jax.Array]:
  """LM rows [B, P + N - 1] of prompt + sample, the loss on the sampled tokens alone (the first
  `lengths` of each row's N, its stop token included) and no NLL (`lm_mask` 0); padding and
  dtypes as `sft_rows`'s, so both kinds of batch share one compile of the train step."""
  n = resp_bn.shape[1]
  on_bn = jnp.arange(n)[None, :] < lengths_b[:, None]
  seq_bl = jnp.concatenate([prompt_bp, resp_bn], axis=1)
  seg_bl = jnp.concatenate([prompt_seg_bp, on_bn.astype(jnp.int32)], axis=1)
  loss_bl = jnp.concatenate([jnp.zeros_like(prompt_bp, bool), on_bn], axis=1)
  mask_bt = loss_bl[:, 1:]
  segments_bt = seg_bl[:, :-1]
  return {"inputs": seq_bl[:, :-1], "targets": jnp.where(mask_bt, seq_bl[:, 1:], 0),
          "loss_mask": mask_bt.astype(jnp.float32), "lm_mask": jnp.zeros(mask_bt.shape),
          "segment_ids": segments_bt,
          "positions": jnp.where(segments_bt > 0, default_positions(segments_bt), 0)}


def sample_rng(state: TrainState) -> jax.Array:
  """The sampling key of the step `state` is about to take: seed and step alone."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, _SAMPLE_SALT), state.step)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """One model's sampling: `params(state)` picks its weights out of the train state."""
  params: Callable[[TrainState], Any]
  cfg: ModelConfig
  peft: PeftConfig = NO_PEFT


def make_host_step(train_step: Callable, batch_sharding: Any, schedule_s: np.ndarray,
                   student: Sampler, teacher: Sampler | None, sampling: SamplingConfig,
                   pad_id: int) -> Callable:
  """The step the loop calls, `(state, batch) -> (state, metrics)`: on a step the schedule marks,
  the batch's LM columns become the student's samples from its prompts (else, with `teacher`, the
  teacher's), then the jitted `train_step`. Metrics add `distill/on_policy` (this step: 0 or 1),
  `distill/on_policy_fraction` (over steps 1..this one) and, on a step that sampled,
  `distill/generated_length` (mean tokens per row, stop token included)."""
  to_rows = jax.jit(sampled_rows, out_shardings=batch_sharding)
  done_s = np.cumsum(schedule_s)
  # The step's number on the host, read from the state once (a resumed run starts past 0), then
  # counted: the loop calls this once per step, and the step counter always advances.
  next_step: list[int | None] = [None]

  def host_step(state: TrainState, batch: dict):
    if next_step[0] is None:
      next_step[0] = int(jax.device_get(state.step))
    k = next_step[0]
    next_step[0] += 1
    on_policy = bool(schedule_s[k])
    source = student if on_policy else teacher
    extra: dict[str, Any] = {"distill/on_policy": float(on_policy),
                             "distill/on_policy_fraction": float(done_s[k]) / (k + 1)}
    if source is not None:
      prompt_bp, prompt_seg_bp = batch["prompt_tokens"], batch["prompt_segments"]
      resp_bn, lengths_b = generate_tokens(source.params(state), prompt_bp, prompt_seg_bp,
                                           sample_rng(state), cfg=source.cfg, sampling=sampling,
                                           pad_id=pad_id, peft=source.peft)
      batch = {**batch, **to_rows(prompt_bp, prompt_seg_bp, resp_bn, lengths_b)}
      extra["distill/generated_length"] = jnp.mean(lengths_b.astype(jnp.float32))
    state, metrics = train_step(state, batch)
    return state, {**metrics, **extra}

  return host_step
