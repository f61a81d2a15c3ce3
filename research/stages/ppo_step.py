"""One PPO iteration as one compiled program: rollout with the KV-cache sampler, scoring, KL-shaped
rewards, GAE, then several epochs of clipped policy/value updates over shuffled minibatches.

The state is the shared `TrainState`: `params = {"policy", "value"}` train under one optimizer;
`frozen` carries what the step reads but does not differentiate: the frozen base weights of each
model, the reference and reward weights, and the (adaptive) KL coefficient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.models.heads import SCORE_HEAD, VALUE_HEAD, apply_with_head, gather_last
from research.models.peft import PeftConfig
from research.objectives import ppo as ppo_math
from research.objectives.lm import token_nll
from research.sampling import SamplingConfig, generate_tokens
from research.stages.lm import merge_params
from research.train.state import TrainState
from research.train.step import mean_gradients

# What the updates read from a rollout (per row, so minibatches can index them).
UPDATE_KEYS = ("seq_bl", "seg_bl", "resp_br", "mask_br", "logp_br", "values_br", "advantages_br",
               "returns_br")
# (response tokens [B, R], response mask [B, R]) -> scores [B]: a programmatic reward.
RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  sampling: SamplingConfig
  pad_id: int
  eos_id: int  # the token that ends every response the reward stage trains on
  kl_kind: str = "k1"
  kl_coef: float = 0.05
  adaptive_kl: bool = False
  kl_target: float = 6.0
  kl_horizon: float = 10000.0
  whiten_rewards: bool = False
  gamma: float = 1.0
  lam: float = 0.95
  cliprange: float = 0.2
  cliprange_value: float = 0.2
  vf_coef: float = 0.1
  epochs: int = 4
  minibatches: int = 1
  micro_batches: int = 1
  missing_eos_penalty: float = 0.0
  value_from_reward: bool = False  # the value model has the reward model's config


@dataclasses.dataclass(frozen=True)
class PPOModels:
  policy_cfg: ModelConfig
  peft: PeftConfig
  value_cfg: ModelConfig
  reward_cfg: ModelConfig | None  # None: `reward_fn` scores
  reward_fn: RewardFn | None = None
  separate_reference: bool = True  # False: the reference is the policy with its adapter off


def response_logprobs(params, cfg: ModelConfig, peft: PeftConfig, seq_bl, seg_bl, prompt_len: int,
                      resp_bt):
  """(log-prob of each response token [B, R], per-position entropy [B, R]) under a policy."""
  logits_blv, _ = Decoder(cfg, peft).apply({"params": params}, seq_bl, seg_bl)
  r = resp_bt.shape[1]
  logits_brv = logits_blv[:, prompt_len - 1:prompt_len - 1 + r]
  return -token_nll(logits_brv, resp_bt), ppo_math.entropy_from_logits(logits_brv)


def value_estimates(params, cfg: ModelConfig, peft: PeftConfig, seq_bl, seg_bl, prompt_len: int,
                    r: int):
  values_bl, _, _ = apply_with_head(params, cfg, VALUE_HEAD, seq_bl, seg_bl, peft=peft)
  return values_bl[:, prompt_len - 1:prompt_len - 1 + r]


def rollout(state: TrainState, batch: dict, rng, models: PPOModels, s: PPOSettings) -> dict:
  """Samples responses and computes everything the update needs (no gradients here)."""
  prompt_bp, prompt_seg_bp = batch["prompt_tokens"], batch["prompt_segments"]
  p = prompt_bp.shape[1]
  frozen = state.frozen
  policy = merge_params(state.params["policy"], frozen["policy"])
  resp_br, lengths_b = generate_tokens(policy, prompt_bp, prompt_seg_bp, rng,
                                       cfg=models.policy_cfg, sampling=s.sampling,
                                       pad_id=s.pad_id, peft=models.peft)
  r = resp_br.shape[1]
  mask_br = (jnp.arange(r)[None, :] < lengths_b[:, None]).astype(jnp.int32)
  seq_bl = jnp.concatenate([prompt_bp, resp_br], axis=1)
  seg_bl = jnp.concatenate([prompt_seg_bp, mask_br], axis=1)
  logp_br, entropy_br = response_logprobs(policy, models.policy_cfg, models.peft, seq_bl, seg_bl,
                                          p, resp_br)
  if models.separate_reference:
    ref_logp_br, _ = response_logprobs(frozen["ref"], models.policy_cfg, PeftConfig(), seq_bl,
                                       seg_bl, p, resp_br)
  else:  # LoRA: the reference is the base alone
    ref_logp_br, _ = response_logprobs(frozen["policy"], models.policy_cfg, PeftConfig(), seq_bl,
                                       seg_bl, p, resp_br)
  value = merge_params(state.params["value"], frozen["value"])
  values_br = value_estimates(value, models.value_cfg, models.peft, seq_bl, seg_bl, p, r)
  stops = jnp.asarray(s.sampling.stop_tokens or (-1,), jnp.int32)
  last_tok_b = jnp.take_along_axis(resp_br, jnp.maximum(lengths_b - 1, 0)[:, None], axis=1)[:, 0]
  has_eos_b = jnp.isin(last_tok_b, stops)
  if models.reward_cfg is not None:
    # The reward stage reads its score at the EOS that ends every response it trains on
    # (research/data/preferences.py). A response that ends with the EOS is read there; any other
    # (cut at max_new_tokens, or stopped on another stop token) gets the EOS appended for the
    # reward model alone, as scripts/score_answers scores text: both are read as finished answers.
    ends_eos_b = (last_tok_b == s.eos_id) & (lengths_b > 0)
    end_b = p + lengths_b  # just after the response: a padding slot, or the column added here
    rows = jnp.arange(seq_bl.shape[0])
    rm_seq = jnp.pad(seq_bl, ((0, 0), (0, 1)), constant_values=s.pad_id)
    rm_seg = jnp.pad(seg_bl, ((0, 0), (0, 1)))
    rm_seq = rm_seq.at[rows, end_b].set(jnp.where(ends_eos_b, rm_seq[rows, end_b], s.eos_id))
    rm_seg = rm_seg.at[rows, end_b].set(jnp.where(ends_eos_b, rm_seg[rows, end_b], 1))
    rm_values_bl, _, _ = apply_with_head(frozen["reward"], models.reward_cfg, SCORE_HEAD, rm_seq,
                                         rm_seg)
    scores_b = gather_last(rm_values_bl, end_b - ends_eos_b.astype(end_b.dtype))
  else:
    scores_b = models.reward_fn(resp_br, mask_br)
  penalized_b = scores_b - s.missing_eos_penalty * (~has_eos_b).astype(jnp.float32)

  kl_br = ppo_math.kl_penalty(logp_br, ref_logp_br, s.kl_kind) * mask_br
  kl_coef = frozen["kl_coef"]
  rewards_br = ppo_math.per_token_rewards(penalized_b, kl_br, kl_coef, mask_br)
  if s.whiten_rewards:
    rewards_br = ppo_math.masked_whiten(rewards_br, mask_br, shift_mean=False)
  advantages_br, returns_br = ppo_math.gae_advantages(values_br, rewards_br, mask_br, s.gamma,
                                                      s.lam)
  advantages_br = ppo_math.masked_whiten(advantages_br, mask_br)
  kl_sum_b = jnp.sum(kl_br, axis=1)
  stats = {
      "objective/kl": jnp.mean(kl_sum_b),
      "objective/entropy": jnp.mean(jnp.sum(entropy_br * mask_br, axis=1)),
      "objective/scores": jnp.mean(scores_b),
      "objective/rlhf_reward": jnp.mean(penalized_b - kl_coef * kl_sum_b),
      "objective/kl_coef": kl_coef,
      "val/explained_variance": ppo_math.explained_variance(values_br, returns_br, mask_br),
      "response_length": jnp.mean(lengths_b.astype(jnp.float32)),
      "eos_fraction": jnp.mean(has_eos_b.astype(jnp.float32)),
  }
  return dict(seq_bl=seq_bl, seg_bl=seg_bl, resp_br=resp_br, mask_br=mask_br, logp_br=logp_br,
              values_br=values_br, advantages_br=advantages_br, returns_br=returns_br,
              stats=stats, scores_b=scores_b, ref_logp_br=ref_logp_br)


def ppo_loss_fn(models: PPOModels, s: PPOSettings, prompt_len: int):
  """(params, frozen, minibatch, rng) -> (sum of token losses, token count, aux) for accumulation."""
  def loss_fn(params, frozen, mb, rng):
    del rng
    policy = merge_params(params["policy"], frozen["policy"])
    value = merge_params(params["value"], frozen["value"])
    r = mb["resp_br"].shape[1]
    new_logp, _ = response_logprobs(policy, models.policy_cfg, models.peft, mb["seq_bl"],
                                    mb["seg_bl"], prompt_len, mb["resp_br"])
    new_values = value_estimates(value, models.value_cfg, models.peft, mb["seq_bl"], mb["seg_bl"],
                                 prompt_len, r)
    mask = mb["mask_br"]
    pg_loss, pg_clipfrac, approxkl = ppo_math.policy_loss(new_logp, mb["logp_br"],
                                                          mb["advantages_br"], mask, s.cliprange)
    vf_loss, vf_clipfrac = ppo_math.value_loss(new_values, mb["values_br"], mb["returns_br"], mask,
                                               s.cliprange_value)
    count = jnp.sum(mask.astype(jnp.float32))
    total = (pg_loss + s.vf_coef * vf_loss) * count
    aux = {"loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
           "policy/clipfrac_avg": pg_clipfrac, "policy/approxkl_avg": approxkl,
           "val/clipfrac_avg": vf_clipfrac}
    return total, count, aux
  return loss_fn


def make_ppo_step(models: PPOModels, s: PPOSettings, tx: optax.GradientTransformation,
                  schedule: optax.Schedule):
  """(state, prompt batch) -> (state, metrics): one rollout and its updates."""

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    roll = rollout(state, batch, jax.random.fold_in(rng, 0), models, s)
    data = {k: v for k, v in roll.items() if k in UPDATE_KEYS}
    b = data["resp_br"].shape[0]
    if b % s.minibatches:
      raise ValueError(f"rollout batch {b} does not split into {s.minibatches} minibatches")
    mb_size = b // s.minibatches
    loss_fn = ppo_loss_fn(models, s, batch["prompt_tokens"].shape[1])

    def one_update(carry, idx_m):
      params, opt_state = carry
      mb = jax.tree.map(lambda x: x[idx_m], data)
      grads, num, den, aux = mean_gradients(loss_fn, params, state.frozen, mb, rng,
                                            s.micro_batches)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), {**aux, "grad_norm": optax.tree.norm(grads)}

    def one_epoch(carry, epoch):
      perm = jax.random.permutation(jax.random.fold_in(rng, 1 + epoch), b)
      return jax.lax.scan(one_update, carry, perm.reshape(s.minibatches, mb_size))

    (params, opt_state), aux = jax.lax.scan(one_epoch, (state.params, state.opt_state),
                                            jnp.arange(s.epochs))
    metrics = {**roll["stats"], **jax.tree.map(jnp.mean, aux), "lr": schedule(state.step)}
    frozen = state.frozen
    if s.adaptive_kl:
      frozen = {**frozen, "kl_coef": ppo_math.adaptive_kl_update(
          frozen["kl_coef"], roll["stats"]["objective/kl"], s.kl_target, s.kl_horizon, b)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         frozen=frozen), metrics

  return step


def wordlist_reward(word_ids: tuple[int, ...]) -> RewardFn:
  """The sanity task's reward: the fraction of response tokens that are in the word list."""
  ids = jnp.asarray(word_ids, jnp.int32)

  def reward(resp_br, mask_br):
    hits = jnp.isin(resp_br, ids) & (mask_br > 0)
    return jnp.sum(hits, axis=1) / jnp.maximum(jnp.sum(mask_br, axis=1), 1)

  return reward
