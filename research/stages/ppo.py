"""PPO (RLHF): a policy from SFT, a frozen reference, a value model, and a frozen reward model or a
named reward function; rollouts and updates are one compiled step (research/stages/ppo_step.py)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from research.data import preferences as pref_data
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError
from research.models.decoder import Decoder
from research.models.heads import SCORE_HEAD, VALUE_HEAD, init_with_head
from research.models.peft import NO_PEFT, split_trainable
from research.sampling import SamplingConfig, left_pad
from research.stages import pretrain, reward, setup
from research.stages.ppo_step import PPOModels, PPOSettings, make_ppo_step, rollout, wordlist_reward
from research.stages.sft import peft_from
from research.stages.training import StageSpec, host_slices, run_training
from research.train import workdir as wd
from research.train.metrics import read_config, read_metrics


def prompt_rows(prompts: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
  tokens, segments = left_pad(prompts, pad_id)
  return {"prompt_tokens": tokens, "prompt_segments": segments}


def word_ids(tokenizer: Any, words) -> tuple[int, ...]:
  """Token ids of each word that is a single token, with and without a leading space."""
  ids = set()
  for word in words:
    for text in (word, " " + word):
      encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
      if len(encoded) == 1:
        ids.add(encoded[0])
  if not ids:
    raise ConfigError(f"reward.words={list(words)}: none is a single token of the tokenizer; "
                      "choose common words")
  return tuple(sorted(ids))


def same_tokenizer(a: Any, b: Any, where: str) -> None:
  if a.get_vocab() != b.get_vocab() or a.eos_token_id != b.eos_token_id:
    raise ConfigError(f"the reward model's tokenizer ({where}) differs from the policy's: PPO "
                      "scores the policy's tokens as they are, so both must share one tokenizer")


def same_prompt_format(config: ConfigDict, rm_dir: str) -> None:
  """The reward model scores rollouts in the prompt format it was trained on: a chat-templated
  reward model reading plain prompts (or the reverse) scores text unlike any it has seen."""
  rm_config = read_config(rm_dir)
  if rm_config is None or rm_config.get("stage") != "reward":
    return
  rm_chat = bool(rm_config.get("data", {}).get("chat_template", False))
  if rm_chat != bool(config.data.get("chat_template", False)):
    raise ConfigError(f"data.chat_template={bool(config.data.get('chat_template', False))} but "
                      f"the reward model in {rm_dir} was trained with data.chat_template="
                      f"{rm_chat} (its config.json): set --config.data.chat_template={rm_chat} so "
                      "the policy's prompts look like the ones it learned to score")


def settings_from(config: ConfigDict, tokenizer: Any) -> PPOSettings:
  p, s = config.ppo, config.sampling
  stops = tuple(s.stop_tokens) or (tokenizer.eos_token_id,)
  sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p, stop_tokens=stops)
  return PPOSettings(
      sampling=sampling, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
      kl_kind=p.kl_kind, kl_coef=p.kl_coef, adaptive_kl=p.adaptive_kl, kl_target=p.kl_target,
      kl_horizon=p.kl_horizon, whiten_rewards=p.whiten_rewards, gamma=p.gamma, lam=p.lam,
      cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
      epochs=p.epochs, minibatches=p.minibatches, micro_batches=config.train.micro_batches,
      missing_eos_penalty=p.missing_eos_penalty)


def ppo_evaluator(rows: dict, models: PPOModels, settings: PPOSettings, tokenizer: Any,
                  samples_path: str, num_samples: int = 2, draws: int = 1):
  """Held-out prompts, each answered `draws` times (one fixed key, so every eval sees the same
  noise): mean and std of the responses' scores, mean KL and length; logs a few samples."""

  def make(_, sharding):
    if not len(rows["prompt_tokens"]):
      return None
    tiled = {k: np.concatenate([v] * draws) for k, v in rows.items()}
    batch = host_slices([tiled], sharding)[0]

    def eval_rollout(state):
      out = rollout(state, batch, jax.random.PRNGKey(1234), models, settings)
      out["stats"]["score_std"] = jnp.std(out["scores_b"], ddof=1)
      return out

    run = jax.jit(eval_rollout)
    calls = [0]

    def evaluate(state) -> dict[str, float]:
      out = run(state)
      stats = jax.device_get(out["stats"])
      if jax.process_index() == 0 and num_samples:
        resp = np.asarray(out["resp_br"])[:num_samples]
        lengths = np.asarray(out["mask_br"]).sum(1)[:num_samples]
        with open(samples_path, "a", encoding="utf-8") as f:
          for i in range(len(resp)):
            prompt = tokenizer.decode(rows["prompt_tokens"][i][rows["prompt_segments"][i] > 0])
            f.write(f"=== eval {calls[0]} sample {i} ===\n{prompt}"
                    f"[[{tokenizer.decode(resp[i][:lengths[i]])}]]\n")
      calls[0] += 1
      return {"eval/score": float(stats["objective/scores"]),
              "eval/score_std": float(stats["score_std"]),
              "eval/kl": float(stats["objective/kl"]),
              "eval/response_length": float(stats["response_length"])}

    return evaluate

  return make


def plot_curves(workdir: str, kl_bound: float) -> str | None:
  """eval/score and eval/kl over steps, as PNG in the workdir."""
  evals = [m for m in read_metrics(workdir) if "eval/score" in m]
  if not evals or jax.process_index() != 0:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = [m["step"] for m in evals]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.plot(steps, [m["eval/score"] for m in evals], marker="o")
  ax1.set(title="held-out mean reward", xlabel="PPO step", ylabel="score")
  ax2.plot(steps, [m["eval/kl"] for m in evals], marker="o", color="tab:red")
  if kl_bound:
    ax2.axhline(kl_bound, linestyle="--", color="gray", label=f"bound {kl_bound}")
    ax2.legend()
  ax2.set(title="KL(policy || reference), summed over tokens", xlabel="PPO step", ylabel="KL")
  fig.tight_layout()
  path = os.path.join(workdir, "ppo_curves.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _prompts(config: ConfigDict, workdir: str, tokenizer) -> tuple[list, list]:
  """(train prompts, held-out prompts) as token-id lists."""
  max_len = config.data.max_prompt_len
  if config.data.path:
    records = pref_data.read_preference_records(
        [p.strip() for p in config.data.path.split(",") if p.strip()])
    train, held_out = pref_data.split_preferences(records, eval_count=config.data.eval_count,
                                                  seed=config.seed)
    if config.data.get("chat_template", False):
      train = pref_data.chat_records(train, tokenizer)
      held_out = pref_data.chat_records(held_out, tokenizer)
    return (pref_data.prompt_ids(train, tokenizer, max_len),
            pref_data.prompt_ids(held_out, tokenizer, max_len))
  # No prompt file: lines of the base corpus, cut to max_prompt_len (the word-list sanity task).
  texts = pretrain.corpus_texts(config.base, os.path.join(workdir, "base"))
  lines = [line.strip() for t in texts for line in t.splitlines() if len(line.strip()) >= 20]
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in lines]
  n_eval = config.data.eval_count
  return ids[n_eval:], ids[:n_eval]


def _reward_model(config: ConfigDict, workdir: str):
  """(reward workdir or None): trains one first when the config names none but needs one."""
  if config.reward.function:
    return None
  if config.reward.model:
    return config.reward.model
  rm_dir = os.path.join(workdir, "reward_model")
  rm_config = ConfigDict(config.reward_training.to_dict())
  rm_config.mesh = ConfigDict(config.mesh.to_dict())
  if not (wd.is_workdir(rm_dir) and os.path.isdir(wd.checkpoint_dir(rm_dir))):
    print(f"no reward.model given: training one in {rm_dir}", flush=True)
    reward.run(rm_config, rm_dir, resume="auto")
  return rm_dir


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  mesh, rules = setup.prepare_run(config, workdir, resume)
  peft = peft_from(config.peft)
  if peft.method not in ("none", "lora"):
    raise ConfigError(f"PPO trains the policy fully or with LoRA; peft.method={peft.method!r}")

  rm_dir = _reward_model(config, workdir)
  init = config.init
  if not init:
    if rm_dir and wd.is_workdir(os.path.join(rm_dir, "base")):
      init = os.path.join(rm_dir, "base")  # the LM the reward model itself started from
    else:
      pretrain.run(_with_mesh(config.base, config), os.path.join(workdir, "base"), resume="auto")
      init = os.path.join(workdir, "base")
  policy_cfg, policy_params, tok_dir = setup.load_init_weights(init, mesh, rules,
                                                                   config.get("model"))
  if not tok_dir:
    raise ConfigError(f"init={init!r} has no tokenizer files beside its weights")
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)

  rm_cfg = rm_params = None
  if rm_dir:
    rm_cfg, _, rm_params, rm_tok, _ = wd.load_run(rm_dir, mesh=mesh, rules=rules)
    if wd.read_head(rm_dir) != SCORE_HEAD:
      raise ConfigError(f"reward.model={rm_dir!r} is not a reward model (no score head)")
    same_tokenizer(tokenizer, tokenizer_lib.load_tokenizer(rm_tok), rm_dir)
    same_prompt_format(config, rm_dir)
    if wd.read_peft_config(rm_dir).method == "lora":
      from research.models.peft import merge_lora  # pylint: disable=import-outside-toplevel
      rm_params = merge_lora(rm_params, wd.read_peft_config(rm_dir))
  value_from_rm = config.value.init == "reward"
  if value_from_rm and rm_cfg is None:
    raise ConfigError("value.init='reward' needs a reward model; with reward.function use "
                      "value.init='policy'")
  value_cfg, value_base = (rm_cfg, rm_params) if value_from_rm else (policy_cfg, policy_params)

  reward_fn = None
  if config.reward.function:
    if config.reward.function != "wordlist":
      raise ConfigError(f"reward.function={config.reward.function!r}; known: 'wordlist'")
    reward_fn = wordlist_reward(word_ids(tokenizer, config.reward.words))
  settings = settings_from(config, tokenizer)
  models = PPOModels(policy_cfg=policy_cfg, peft=peft, value_cfg=value_cfg, reward_cfg=rm_cfg,
                     reward_fn=reward_fn, separate_reference=peft.method == "none")

  train_prompts, eval_prompts = _prompts(config, workdir, tokenizer)
  train_rows = prompt_rows(train_prompts, tokenizer.pad_token_id)
  eval_rows = prompt_rows(eval_prompts, tokenizer.pad_token_id) if eval_prompts else \
      {"prompt_tokens": np.zeros((0, 1), np.int32)}
  wd.write_model_files(workdir, policy_cfg, tokenizer, peft)
  setup.save_run_config(workdir, config)

  def init_fn(rng):
    r_pol, r_val, r_ref, r_rm = jax.random.split(rng, 4)
    tokens = jnp.zeros((1, 8), jnp.int32)
    pol_train, pol_frozen = split_trainable(
        Decoder(policy_cfg, peft).init(r_pol, tokens)["params"], peft)
    val_train, val_frozen = split_trainable(init_with_head(value_cfg, peft, VALUE_HEAD, r_val),
                                            peft)
    frozen = {"policy": pol_frozen, "value": val_frozen,
              "kl_coef": jnp.asarray(config.ppo.kl_coef, jnp.float32)}
    if models.separate_reference:
      frozen["ref"] = Decoder(policy_cfg).init(r_ref, tokens)["params"]
    if rm_cfg is not None:
      frozen["reward"] = init_with_head(rm_cfg, NO_PEFT, SCORE_HEAD, r_rm)
    return {"policy": pol_train, "value": val_train}, frozen

  base = {"policy": policy_params, "value": value_base, "ref": policy_params}
  if rm_params is not None:
    base["reward"] = rm_params
  spec = StageSpec(
      init_fn=init_fn, train_loss=None, train_rows=train_rows,
      tokens_per_row=train_rows["prompt_tokens"].shape[1] + settings.sampling.max_new_tokens,
      base_params=base, make_step=lambda tx, schedule: make_ppo_step(models, settings, tx,
                                                                     schedule),
      updates_per_step=settings.epochs * settings.minibatches,
      make_evaluator=ppo_evaluator(eval_rows, models, settings, tokenizer,
                                   os.path.join(workdir, "samples.txt"),
                                   draws=config.data.eval_draws),
      meta={"model_config": policy_cfg.to_dict(), "peft_config": peft.to_dict()},
      lm_loss=False)
  state, last_eval = run_training(config, workdir, resume, spec, mesh=mesh, rules=rules)
  plot = plot_curves(workdir, config.ppo.kl_bound)
  logging.info("PPO curves: %s", plot)
  return {"state": state, "eval": last_eval, "plot": plot, "models": models,
          "settings": dataclasses.asdict(settings)}


def _with_mesh(section: ConfigDict, config: ConfigDict) -> ConfigDict:
  out = ConfigDict(section.to_dict())
  out.mesh = ConfigDict(config.mesh.to_dict())
  return out
