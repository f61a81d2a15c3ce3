"""GRPO (and DAPO, Dr. GRPO, RLOO): a policy (full or LoRA) learns from rewards that are code, on a
verifiable task; the step is research/stages/grpo_step.py, the road the shared `run_training`."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from research import rewards as rewards_lib
from research.data import arithmetic
from research.data import tokenizer as tokenizer_lib
from research.data.chat_template import has_chat_template
from research.errors import ConfigError, DataError
from research.models.decoder import Decoder
from research.models.heads import SCORE_HEAD, apply_with_head, gather_last
from research.models.peft import split_trainable
from research.objectives import grpo as grpo_math
from research.sampling import SamplingConfig, generate_tokens, left_pad
from research.stages import base_model, setup
from research.stages.grpo_step import (GRPOModels, GRPOSettings, decode_rollouts, make_host_step,
                                       make_update_step, reward_metrics)
from research.stages.sft import peft_from
from research.stages.training import StageSpec, run_training
from research.train import workdir as wd


def settings_from(config: ConfigDict, tokenizer: Any) -> GRPOSettings:
  """GRPO settings, checked here so nothing inside the step has to."""
  g, s = config.grpo, config.sampling
  checks = [
      (g.group_size >= 2, f"grpo.group_size={g.group_size}: a group needs at least 2 completions"),
      (g.advantage in grpo_math.ADVANTAGES,
       f"grpo.advantage={g.advantage!r}; choose one of {grpo_math.ADVANTAGES}"),
      (g.loss_type in grpo_math.LOSS_TYPES,
       f"grpo.loss_type={g.loss_type!r}; choose one of {grpo_math.LOSS_TYPES}"),
      (0.0 <= g.epsilon_low < 1.0 and g.epsilon_high >= 0.0,
       f"grpo.epsilon_low={g.epsilon_low} must lie in [0, 1) and grpo.epsilon_high="
       f"{g.epsilon_high} be >= 0"),
      (g.beta >= 0.0, f"grpo.beta={g.beta} must be >= 0 (0: no KL term, no reference held)"),
      (g.iterations >= 1, f"grpo.iterations={g.iterations} must be >= 1"),
      (s.temperature > 0.0, f"sampling.temperature={s.temperature}: greedy sampling gives a group "
       "G equal completions, which teach nothing; use a temperature > 0"),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
  stops = tuple(s.stop_tokens) or (tokenizer.eos_token_id,)
  sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p, stop_tokens=stops)
  return GRPOSettings(sampling=sampling, pad_id=tokenizer.pad_token_id, group_size=g.group_size,
                      advantage=g.advantage, loss_type=g.loss_type, epsilon_low=g.epsilon_low,
                      epsilon_high=g.epsilon_high, beta=g.beta, iterations=g.iterations,
                      micro_batches=config.train.micro_batches)


def read_task_file(path: str, eval_count: int) -> tuple[list[dict], list[dict]]:
  """(train, held-out) records of a jsonl file: each an object with a string `prompt` and any
  fields the reward functions read; the last `eval_count` records are held out."""
  records = []
  if not os.path.isfile(path):
    raise DataError(f"task.path={path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not JSON ({e})") from e
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise DataError(f"{path}:{number}: field 'prompt' must be a string in a JSON object")
      records.append({**record, "index": len(records)})
  if len(records) <= eval_count:
    raise DataError(f"{path}: {len(records)} records, not more than task.eval_count={eval_count}")
  return records[:len(records) - eval_count], records[len(records) - eval_count:]


def task_examples(task: ConfigDict, seed: int) -> tuple[list[dict], list[dict]]:
  if task.path:
    return read_task_file(task.path, task.eval_count)
  if task.name != "arithmetic":
    raise ConfigError(f"task.name={task.name!r}; the shipped task is 'arithmetic' (or give "
                      "task.path, a jsonl file of prompts)")
  return arithmetic.train_and_held_out(task.train_count, task.eval_count, seed, task.operations,
                                       task.max_value)


def prompt_ids(examples: Sequence[dict], tokenizer: Any, chat: bool,
               max_len: int) -> list[list[int]]:
  """Token ids of each prompt: as a user turn of the tokenizer's chat template (with the assistant
  turn opened) when it has one and `chat`, else the text itself; cut to the last `max_len`."""
  use_template = chat and has_chat_template(tokenizer)
  out = []
  for ex in examples:
    text = ex["prompt"]
    if use_template:
      text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    out.append(tokenizer(text, add_special_tokens=not use_template)["input_ids"][-max_len:])
  return out


def prompt_rows(ids: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
  tokens, segments = left_pad(ids, pad_id)
  return {"prompt_tokens": tokens, "prompt_segments": segments,
          "example_index": np.arange(len(ids), dtype=np.int32)}


def reward_model_function(rm_dir: str, mesh, rules, batch_size: int = 16,
                          max_len: int = 512) -> Callable:
  """A reward model of the reward stage as a batched reward function: scores prompt + completion
  text, tokenised with the reward model's own tokenizer (so it need not share the policy's) the
  way the reward stage tokenised its pairs: prompt and completion each without special tokens,
  then its EOS, where the score is read; the prompt is cut from the left to fit `max_len`."""
  if wd.read_head(rm_dir) != SCORE_HEAD:
    raise ConfigError(f"reward.model={rm_dir!r} is not a reward model workdir (no score head)")
  cfg, peft, params, tok_dir, _ = wd.load_run(rm_dir, mesh=mesh, rules=rules)
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  score = jax.jit(lambda p, t, s: apply_with_head(p, cfg, SCORE_HEAD, t, s, peft=peft)[0])
  encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

  def rm_ids(prompt: str, completion: str) -> list[int]:
    answer = encode(completion)[:max_len - 2] + [tokenizer.eos_token_id]
    return encode(prompt)[-(max_len - len(answer)):] + answer

  def reward_model(prompts, completions, examples):
    del examples
    out = []
    for lo in range(0, len(prompts), batch_size):
      ids = [rm_ids(p, c) for p, c in zip(prompts[lo:lo + batch_size],
                                          completions[lo:lo + batch_size])]
      n = len(ids)
      ids += [ids[0]] * (batch_size - len(ids))  # one static shape, one compile
      width = max(len(i) for i in ids)
      tokens = np.full((batch_size, width), tokenizer.pad_token_id, np.int32)
      segments = np.zeros((batch_size, width), np.int32)
      for row, i in enumerate(ids):
        tokens[row, :len(i)], segments[row, :len(i)] = i, 1
      values = score(params, jnp.asarray(tokens), jnp.asarray(segments))
      last = gather_last(values, jnp.asarray(segments.sum(1) - 1))
      out.extend(np.asarray(last)[:n].tolist())
    return out

  reward_model.batched = True
  return reward_model


def grpo_evaluator(examples: Sequence[dict], ids: list[list[int]], models: GRPOModels,
                   s: GRPOSettings, reward_fns, tokenizer: Any, batch_size: int, tag: str,
                   samples_path: str, num_samples: int = 2):
  """Held-out prompts, one greedy completion each: `eval/reward`, per-function means, and
  `eval/accuracy` (exact answer) when the task's records carry an `answer`."""
  greedy = SamplingConfig(max_new_tokens=s.sampling.max_new_tokens,
                          stop_tokens=s.sampling.stop_tokens)
  with_answers = all("answer" in ex for ex in examples)

  def make(_, sharding):
    if not examples:
      return None
    tokens, segments = left_pad(ids, s.pad_id)
    calls = [0]

    def evaluate(state) -> dict[str, float]:
      policy = models.policy(state.params, state.frozen)
      resp, lengths = [], []
      for lo in range(0, len(ids), batch_size):
        t, sg = tokens[lo:lo + batch_size], segments[lo:lo + batch_size]
        pad = batch_size - len(t)  # fill the last batch: one static shape
        t = np.concatenate([t, np.repeat(t[:1], pad, 0)])
        sg = np.concatenate([sg, np.repeat(sg[:1], pad, 0)])
        r, n = generate_tokens(policy, jax.device_put(t, sharding), jax.device_put(sg, sharding),
                               jax.random.PRNGKey(0), cfg=models.policy_cfg, sampling=greedy,
                               pad_id=s.pad_id, peft=models.peft)
        resp.append(np.asarray(r)[:batch_size - pad])
        lengths.append(np.asarray(n)[:batch_size - pad])
      rollouts = decode_rollouts(np.concatenate(resp), np.concatenate(lengths), examples,
                                 tokenizer, s.sampling.stop_tokens)
      prompts = [ex["prompt"] for ex in examples]
      total, per_fn = rewards_lib.score(reward_fns, prompts, rollouts.completions,
                                        rollouts.examples)
      metrics = {"eval/reward": float(total.mean()),
                 **{k: v for k, v in reward_metrics(total, per_fn, "eval/").items()
                    if k.endswith("/mean")},
                 "eval/completions/mean_length": float(rollouts.lengths_n.mean())}
      if with_answers:
        metrics["eval/accuracy"] = float(np.mean([
            arithmetic.is_correct(c, ex["answer"], tag)
            for c, ex in zip(rollouts.completions, examples)]))
      if jax.process_index() == 0 and num_samples:
        with open(samples_path, "a", encoding="utf-8") as f:
          for i in range(min(num_samples, len(examples))):
            f.write(f"=== eval {calls[0]} sample {i} (reward {total[i]:.3f}) ===\n"
                    f"{prompts[i]}[[{rollouts.completions[i]}]]\n")
      calls[0] += 1
      return metrics

    return evaluate

  return make


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  mesh, rules = setup.prepare_run(config, workdir, resume)
  if jax.process_count() > 1:
    raise ConfigError("GRPO scores completions on the host and runs in one process for now; "
                      "launch it without --num_processes")
  peft = peft_from(config.peft)
  if peft.method not in ("none", "lora"):
    raise ConfigError(f"GRPO trains the policy fully or with LoRA; peft.method={peft.method!r}")
  train_examples, held_out = task_examples(config.task, config.seed)

  init = config.init
  if not init:  # a small base that has read the task's problems with their answers
    init = base_model.build_base(config.base, config.mesh, workdir,
                                 [arithmetic.worked_text(ex) for ex in train_examples]
                                 if "answer" in train_examples[0] else
                                 [ex["prompt"] for ex in train_examples])
  cfg, policy_params, tok_dir = setup.load_init_weights(init, mesh, rules, config.get("model"))
  if not tok_dir:
    raise ConfigError(f"init={init!r} has no tokenizer files beside its weights")
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  s = settings_from(config, tokenizer)
  models = GRPOModels(policy_cfg=cfg, peft=peft)
  holds_ref = peft.method == "none" and s.beta > 0

  extra = {}
  if "reward_model" in [n for n, _ in rewards_lib.parse_spec(config.reward.functions)]:
    if not config.reward.model:
      raise ConfigError("reward.functions names 'reward_model' but reward.model is empty: give "
                        "the workdir of a reward-stage run")
    extra["reward_model"] = reward_model_function(config.reward.model, mesh, rules)
  reward_fns = rewards_lib.build(config.reward.functions, config.reward, extra)

  chat, max_len = config.task.chat_template, config.task.max_prompt_len
  train_ids = prompt_ids(train_examples, tokenizer, chat, max_len)
  eval_ids = prompt_ids(held_out, tokenizer, chat, max_len)
  train_rows = prompt_rows(train_ids, tokenizer.pad_token_id)
  wd.write_model_files(workdir, cfg, tokenizer, peft)
  setup.save_run_config(workdir, config)

  def init_fn(rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    trainable, frozen = split_trainable(Decoder(cfg, peft).init(rng, tokens)["params"], peft)
    if holds_ref:
      frozen = {"ref": Decoder(cfg).init(jax.random.fold_in(rng, 1), tokens)["params"]}
    return trainable, frozen

  base = {**policy_params, "ref": policy_params} if holds_ref else policy_params
  spec = StageSpec(
      init_fn=init_fn, train_loss=None, train_rows=train_rows,
      tokens_per_row=s.group_size * (train_rows["prompt_tokens"].shape[1] +
                                     s.sampling.max_new_tokens),
      base_params=base,
      make_step=lambda tx, schedule: make_update_step(models, s, tx, schedule),
      updates_per_step=s.iterations,
      wrap_step=lambda update, sharding: make_host_step(
          update, sharding, models, s, reward_fns, train_examples,
          [ex["prompt"] for ex in train_examples], tokenizer),
      make_evaluator=grpo_evaluator(held_out, eval_ids, models, s, reward_fns, tokenizer,
                                    config.train.eval_batch_size, config.reward.tag,
                                    os.path.join(workdir, "samples.txt")),
      meta={"model_config": cfg.to_dict(), "peft_config": peft.to_dict()},
      lm_loss=False)
  state, last_eval = run_training(config, workdir, resume, spec, mesh=mesh, rules=rules)
  return {"state": state, "eval": last_eval, "models": models, "settings": s,
          "tokenizer": tokenizer}
