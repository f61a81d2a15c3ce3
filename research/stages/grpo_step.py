"""One GRPO step: B prompts, G completions each, sampled in one compiled program; rewards scored on
the host; group advantages; then `iterations` clipped updates in one jitted step.

Rewards are Python code, so they cannot run inside `jit`: a step makes one host round trip (after
sampling, before the update), never one per token. The loop calls the host step (`make_host_step`)
with the prompt batch; it samples, scores, and hands the rollouts to the jitted update
(`make_update_step`), the shared road's `(state, batch) -> (state, metrics)`.

State: `params` is the policy's trainable part and `frozen` its frozen part, as every stage keeps
them (so a GRPO workdir loads like an SFT one). With LoRA the reference is the frozen base, the
adapter off; a fully trained policy keeps its reference as `frozen = {"ref": ...}`, and only when
`beta > 0`: with beta 0 no reference is held at all.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import rewards as rewards_lib
from research.models.config import ModelConfig
from research.models.peft import NO_PEFT, PeftConfig
from research.objectives import grpo as grpo_math
from research.sampling import SamplingConfig, generate_tokens
from research.stages.lm import merge_params
from research.stages.ppo_step import response_logprobs
from research.train.state import TrainState
from research.train.step import mean_gradients


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  sampling: SamplingConfig
  pad_id: int
  group_size: int = 8
  advantage: str = "group_std"
  loss_type: str = "dapo"
  epsilon_low: float = 0.2
  epsilon_high: float = 0.28
  beta: float = 0.0
  iterations: int = 1
  micro_batches: int = 1


@dataclasses.dataclass(frozen=True)
class GRPOModels:
  policy_cfg: ModelConfig
  peft: PeftConfig = NO_PEFT

  def policy(self, params: Any, frozen: Any) -> Any:
    return merge_params(params, frozen) if self.peft.method != "none" else params

  def reference(self, frozen: Any) -> Any:
    return frozen if self.peft.method != "none" else frozen["ref"]


def keeps_old_logprobs(s: GRPOSettings) -> bool:
  """With one pass the old policy is the current one: the ratio is exp(logp - stop_grad(logp)) =
  1 exactly (TRL does the same), so no separate forward is needed."""
  return s.iterations > 1


def rollout_rng(state: TrainState) -> jax.Array:
  """The sampling key: a function of the run's seed (`state.rng`) and the step alone, so a resumed
  run samples what the straight run sampled."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)


def sample_completions(state: TrainState, prompt_np: jax.Array, prompt_seg_np: jax.Array,
                       models: GRPOModels, s: GRPOSettings) -> tuple[jax.Array, jax.Array]:
  """(completions [N, R], lengths [N]) from the policy in one compiled program (the sampler's)."""
  policy = models.policy(state.params, state.frozen)
  return generate_tokens(policy, prompt_np, prompt_seg_np, rollout_rng(state),
                         cfg=models.policy_cfg, sampling=s.sampling, pad_id=s.pad_id,
                         peft=models.peft)


def make_logprob_program(models: GRPOModels, s: GRPOSettings) -> Callable | None:
  """Jitted `(state, rows) -> {old_logp_nr?, ref_logp_nr?}`, or None when the update needs
  neither (one iteration, beta 0)."""
  old, ref = keeps_old_logprobs(s), bool(s.beta)
  if not (old or ref):
    return None

  def program(state: TrainState, rows: dict) -> dict:
    p = rows["seq_nl"].shape[1] - rows["resp_nr"].shape[1]
    args = (rows["seq_nl"], rows["seg_nl"], p, rows["resp_nr"])
    out = {}
    if old:
      policy = models.policy(state.params, state.frozen)
      out["old_logp_nr"] = response_logprobs(policy, models.policy_cfg, models.peft, *args)[0]
    if ref:
      out["ref_logp_nr"] = response_logprobs(models.reference(state.frozen), models.policy_cfg,
                                             NO_PEFT, *args)[0]
    return out

  return jax.jit(program)


def grpo_loss_fn(models: GRPOModels, s: GRPOSettings):
  """(params, frozen, rollouts, rng) -> (numerator, denominator, aux), for `mean_gradients`."""
  def loss_fn(params, frozen, rows, rng):
    del rng
    r = rows["resp_nr"].shape[1]
    p = rows["seq_nl"].shape[1] - r
    policy = models.policy(params, frozen)
    logp_nr, entropy_nr = response_logprobs(policy, models.policy_cfg, models.peft, rows["seq_nl"],
                                            rows["seg_nl"], p, rows["resp_nr"])
    old_nr = rows.get("old_logp_nr", jax.lax.stop_gradient(logp_nr))
    num, den, sums = grpo_math.grpo_loss(
        logp_nr, old_nr, rows["advantages_n"], rows["mask_nr"], loss_type=s.loss_type,
        epsilon_low=s.epsilon_low, epsilon_high=s.epsilon_high, max_completion_length=r,
        ref_logprobs_nt=rows.get("ref_logp_nr"), beta=s.beta)
    sums["entropy"] = jnp.sum(entropy_nr * rows["mask_nr"])
    return num, den, sums
  return loss_fn


def make_update_step(models: GRPOModels, s: GRPOSettings, tx: optax.GradientTransformation,
                     schedule: optax.Schedule):
  """(state, rollouts) -> (state, metrics): `iterations` optimiser updates over the same rollouts,
  the old log-probs fixed at sampling time. The stage builds `tx` with
  `updates_per_step=iterations`, so its schedule follows steps, not updates."""
  loss_fn = grpo_loss_fn(models, s)

  def step(state: TrainState, rows: dict):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)

    def one_update(carry, _):
      params, opt_state = carry
      grads, num, den, sums = mean_gradients(loss_fn, params, state.frozen, rows, rng,
                                             s.micro_batches)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), {"loss": num / den, "grad_norm": optax.tree.norm(grads), **sums}

    (params, opt_state), per_pass = jax.lax.scan(one_update, (state.params, state.opt_state),
                                                 None, length=s.iterations)
    tokens = jnp.maximum(per_pass["tokens"], 1.0)
    ratio = lambda k: jnp.mean(per_pass[k] / tokens)  # noqa: E731 - token means, per pass
    metrics = {"loss": jnp.mean(per_pass["loss"]), "grad_norm": jnp.mean(per_pass["grad_norm"]),
               "entropy": ratio("entropy"), "clip_ratio/low_mean": ratio("low_clipped"),
               "clip_ratio/high_mean": ratio("high_clipped"),
               "clip_ratio/region_mean": ratio("region_clipped"), "lr": schedule(state.step)}
    if "kl" in per_pass:
      metrics["kl"] = ratio("kl")
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


@dataclasses.dataclass
class Rollouts:
  """What one sampling pass gave, on the host: rows are prompt b's completions b*G .. b*G+G-1."""
  resp_nr: np.ndarray
  lengths_n: np.ndarray
  terminated_n: np.ndarray  # ended on a stop token (else cut at max_new_tokens)
  completions: list[str]
  examples: list[dict]  # the task's record + completion_ids

  def stats(self) -> dict[str, float]:
    """TRL's `completions/*` metrics."""
    lengths = self.lengths_n.astype(np.float64)
    done = lengths[self.terminated_n]
    return {"completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(1.0 - self.terminated_n.mean()),
            "completions/mean_terminated_length": float(done.mean()) if len(done) else 0.0}


def decode_rollouts(resp_nr, lengths_n, examples: Sequence[dict], tokenizer: Any,
                    stop_tokens: Sequence[int]) -> Rollouts:
  resp_nr, lengths_n = np.asarray(resp_nr), np.asarray(lengths_n)
  last_n = resp_nr[np.arange(len(resp_nr)), np.maximum(lengths_n - 1, 0)]
  terminated_n = (lengths_n > 0) & np.isin(last_n, list(stop_tokens))
  ids = [row[:n].tolist() for row, n in zip(resp_nr, lengths_n)]
  completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
  examples = [{**ex, "completion_ids": i} for ex, i in zip(examples, ids)]
  return Rollouts(resp_nr, lengths_n, terminated_n, completions, examples)


def reward_metrics(total_n: np.ndarray, per_fn: dict[str, np.ndarray], prefix: str = ""
                   ) -> dict[str, float]:
  out = {f"{prefix}rewards/{name}/mean": float(v.mean()) for name, v in per_fn.items()}
  out.update({f"{prefix}rewards/{name}/std": float(v.std(ddof=1)) if len(v) > 1 else 0.0
              for name, v in per_fn.items()})
  return out


def make_host_step(update_step: Callable, batch_sharding, models: GRPOModels, s: GRPOSettings,
                   reward_fns: Sequence[rewards_lib.WeightedReward], examples: Sequence[dict],
                   prompt_texts: Sequence[str], tokenizer: Any) -> Callable:
  """The step the loop calls, `(state, prompt batch) -> (state, metrics)`: sample (compiled),
  score (host), update (jitted). `examples[i]` is the record of prompt row `i`; the batch holds
  `prompt_tokens`, `prompt_segments` and `example_index`. Metrics include the step's time split."""
  logprob_program = make_logprob_program(models, s)
  g = s.group_size
  put = lambda x: jax.device_put(x, batch_sharding)  # noqa: E731

  def host_step(state: TrainState, batch: dict):
    start = time.perf_counter()
    index_b = np.asarray(jax.device_get(batch["example_index"]))
    prompt_np = put(np.repeat(np.asarray(jax.device_get(batch["prompt_tokens"])), g, axis=0))
    prompt_seg_np = put(np.repeat(np.asarray(jax.device_get(batch["prompt_segments"])), g,
                                  axis=0))
    resp_nr, lengths_n = sample_completions(state, prompt_np, prompt_seg_np, models, s)
    mask_nr = (jnp.arange(resp_nr.shape[1])[None, :] < lengths_n[:, None]).astype(jnp.int32)
    rows = {"seq_nl": jnp.concatenate([prompt_np, resp_nr], axis=1),
            "seg_nl": jnp.concatenate([prompt_seg_np, mask_nr], axis=1),
            "resp_nr": resp_nr, "mask_nr": mask_nr}
    if logprob_program is not None:
      rows.update(logprob_program(state, rows))
    host_resp, host_lengths = jax.device_get((resp_nr, lengths_n))
    jax.block_until_ready(rows)
    generated = time.perf_counter()

    row_examples = [examples[i] for i in index_b for _ in range(g)]
    rollouts = decode_rollouts(host_resp, host_lengths, row_examples, tokenizer,
                               s.sampling.stop_tokens)
    prompts = [prompt_texts[i] for i in index_b for _ in range(g)]
    total_n, per_fn = rewards_lib.score(reward_fns, prompts, rollouts.completions,
                                        rollouts.examples)
    rewards_bg = total_n.reshape(-1, g)
    advantages_n = np.asarray(grpo_math.group_advantages(rewards_bg, s.advantage)).reshape(-1)
    rows["advantages_n"] = put(advantages_n.astype(np.float32))
    host_metrics = {k: float(v) for k, v in grpo_math.group_stats(rewards_bg).items()}
    host_metrics.update(reward_metrics(total_n, per_fn))
    host_metrics.update(rollouts.stats())
    scored = time.perf_counter()

    state, metrics = update_step(state, {k: put(v) for k, v in rows.items()})
    jax.block_until_ready(metrics)  # the next step samples from this state anyway
    trained = time.perf_counter()
    host_metrics.update({"time/generation": generated - start, "time/scoring": scored - generated,
                         "time/training": trained - scored})
    return state, {**metrics, **host_metrics}

  return host_step
