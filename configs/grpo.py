"""GRPO configs: `--config=configs/grpo.py:<preset>`.

Presets:
  arithmetic  the shipped verifiable task on CPU: a small base pretrained here on the training
              problems with their answers, then GRPO on exact-answer + format rewards; held-out
              accuracy at every eval.
  smollm2     the same task from SmolLM2-135M-Instruct (fetched on first use), full fine-tune.
  smollm2_lora  LoRA (r=16 on all seven projections) from SmolLM2-135M-Instruct, sized for 2 CPU
              cores: one-operation problems, 60 steps of 4 prompts x 8 completions (about an
              hour; held-out accuracy 0.11 -> 0.27), held-out accuracy every 10 steps.
  dapo        smollm2 with DAPO's choices: clip-higher (0.2 / 0.28), token-level loss, no KL.
  test        seconds-long run for tests.
"""

from ml_collections import ConfigDict

from configs import common, pretrain
from configs.sft import peft_config


def base_config() -> ConfigDict:
  return ConfigDict(dict(
      stage="grpo",
      seed=0,
      init="",  # the policy's start (a workdir or HF dir); '' = a small base built here
      peft=peft_config(method="none"),
      task=ConfigDict(dict(
          name="arithmetic",  # generated word problems (research/data/arithmetic.py)
          path="",  # or a jsonl file of {"prompt": ..., other fields}; the last eval_count held out
          train_count=4000, eval_count=64,
          operations=1, max_value=20,  # difficulty: operations after the first number, largest
          chat_template=True,  # prompts as a user turn when the tokenizer has a chat template
          max_prompt_len=160,
      )),
      reward=ConfigDict(dict(
          # name:weight, ...: registry names (research/rewards.py), 'reward_model', or
          # 'package.module.function' of your own
          functions="exact_answer:1.0,answer_format:0.2",
          tag="answer",  # exact_answer / answer_format read <tag>...</tag>
          max_chars=400,  # length_penalty starts beyond this many characters
          model="",  # a reward-stage workdir, for 'reward_model'
      )),
      sampling=ConfigDict(dict(max_new_tokens=48, temperature=1.0, top_k=0, top_p=1.0,
                               stop_tokens=())),
      grpo=ConfigDict(dict(
          group_size=8,  # G completions per prompt; train.global_batch is B, the prompts per step
          advantage="group_std",  # group_std (GRPO), group_mean (Dr. GRPO), rloo
          loss_type="dapo",  # grpo (per-sequence mean), dapo (token mean), dr_grpo (constant)
          epsilon_low=0.2, epsilon_high=0.28,  # clip range [1 - low, 1 + high]; DAPO's clip-higher
          beta=0.0,  # k3 KL coefficient; 0 holds no reference model
          iterations=1,  # optimisation passes over each batch of rollouts
      )),
      base=pretrain.get_config("test"),
      train=common.train_config(steps=100, global_batch=8, eval_every=20, log_every=5,
                                checkpoint_every=50, eval_batch_size=32),
      optimizer=common.optimizer_config(lr=1e-5, warmup_steps=0, weight_decay=0.0,
                                        schedule="constant"),
      mesh=common.mesh_config(),
      model=common.runtime_config(),
  ))


def _arithmetic(c: ConfigDict) -> None:
  # The base reads 4000 problems with answers (about 40 tokens each) for 300 steps.
  c.base.model.update(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=344)
  c.base.data.update(vocab_size=1024, tokenizer_train_bytes=1_000_000, seq_len=128)
  c.base.train.update(steps=300, eval_every=0, checkpoint_every=300, sample_tokens=16,
                      sample_prompts=("Ava has 3 apples.",))
  c.sampling.max_new_tokens = 16
  c.optimizer.lr = 3e-4
  c.train.update(steps=60, global_batch=8, eval_every=10)


def _smollm2(c: ConfigDict) -> None:
  c.init = "fetch:smollm2-135m-instruct"
  c.task.update(operations=2, max_value=30)
  c.sampling.update(max_new_tokens=96, temperature=1.0, top_p=1.0)
  c.grpo.update(group_size=8, beta=0.0)
  c.optimizer.update(lr=1e-6, clip_norm=1.0)
  c.train.update(steps=200, global_batch=8, eval_every=20, checkpoint_every=50)


def _smollm2_lora(c: ConfigDict) -> None:
  # Each step samples 32 completions of up to 96 tokens and trains on them once; the reference
  # would be the base with the adapter off, but beta=0 holds none.
  _smollm2(c)
  # One operation: at smollm2's two (up to 30) greedy decoding solves 2 of the 64 held-out
  # problems and sampled groups score all zero, so no group has an advantage to learn from.
  c.task.update(operations=1, max_value=20)
  c.peft.update(method="lora", r=16, alpha=32.0, dropout=0.0,
                targets=("q", "k", "v", "o", "gate", "up", "down"))
  c.optimizer.update(lr=1e-4, clip_norm=1.0)
  # Most of the held-out gain comes after step 30 (docs/results.md).
  c.train.update(steps=60, global_batch=4, eval_every=10, checkpoint_every=10)


def _dapo(c: ConfigDict) -> None:
  _smollm2(c)
  c.grpo.update(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
                advantage="group_std")


def _test(c: ConfigDict) -> None:
  c.task.update(train_count=400, eval_count=16)
  c.base.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  c.base.data.update(vocab_size=300, tokenizer_train_bytes=100_000, seq_len=64)
  c.base.train.update(steps=20, global_batch=8, eval_every=0, checkpoint_every=20,
                      sample_prompts=(), log_every=10)
  c.model.remat_policy = "none"  # nothing to save at this size; compiles faster
  c.sampling.max_new_tokens = 8
  c.grpo.group_size = 4
  c.optimizer.lr = 3e-3
  c.train.update(steps=20, global_batch=8, eval_every=10, log_every=5, checkpoint_every=10,
                 eval_batch_size=8)


PRESETS = {"arithmetic": _arithmetic, "smollm2": _smollm2, "smollm2_lora": _smollm2_lora,
           "dapo": _dapo, "test": _test}


def get_config(preset: str = "arithmetic") -> ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/grpo.py; choose one of "
                     f"{sorted(PRESETS)}")
  c = base_config()
  PRESETS[preset](c)
  return c
