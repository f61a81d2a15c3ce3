"""PPO configs: `--config=configs/ppo.py:<preset>`.

Presets:
  hh_rlhf   PPO against a reward model trained on data/hh_rlhf_harmless_test_500.jsonl,
            prompts from the same file (held-out prompts for eval). With no `reward.model` it
            trains the reward model first (configs/reward.py:hh_rlhf), and with no `init` the
            policy starts from that reward model's base LM.
  hh_rlhf_smollm2  the same on SmolLM2-135M-Instruct (fetched on first use): a LoRA policy from
            the instruct model (or an SFT run: --config.init=DIR), the reward model of
            configs/reward.py:hh_rlhf_smollm2 (trained first unless --config.reward.model=DIR).
  wordlist  the sanity task: reward = fraction of response tokens from a word list, on a small
            code model pretrained here on the Python standard library.
  test      seconds-long wordlist run for tests.
"""

from ml_collections import ConfigDict

from configs import common, pretrain, reward
from configs.sft import peft_config


def base_config() -> ConfigDict:
  return ConfigDict(dict(
      stage="ppo",
      seed=0,
      init="",  # the policy's start (an SFT workdir or HF dir); '' = a base built here
      peft=peft_config(method="none"),
      reward=ConfigDict(dict(
          model="",  # a reward-model workdir; '' = train one (reward_training) unless function
          function="",  # 'wordlist': a programmatic reward instead of a model
          words=("self", "return", "None", "if", "not", "in"),
      )),
      value=ConfigDict(dict(init="reward")),  # 'reward': RM weights + fresh head; 'policy'
      # eval_draws: sampled responses per held-out prompt at each eval (one fixed key);
      # chat_template: prompts as in configs/reward.py (match the reward model's own setting).
      data=ConfigDict(dict(path="", max_prompt_len=64, eval_count=16, eval_draws=1,
                           chat_template=False)),
      sampling=ConfigDict(dict(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0,
                               stop_tokens=())),
      ppo=ConfigDict(dict(
          kl_kind="k1", kl_coef=0.05, adaptive_kl=False, kl_target=6.0, kl_horizon=10000.0,
          whiten_rewards=False, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
          vf_coef=0.1, epochs=4, minibatches=2, missing_eos_penalty=0.0,
          kl_bound=10.0,  # drawn on the KL plot; the KL the run is expected to stay under
      )),
      base=pretrain.get_config("tiny"),
      reward_training=reward.get_config("hh_rlhf"),
      train=common.train_config(steps=60, global_batch=16, eval_every=10, log_every=5,
                                checkpoint_every=20),
      optimizer=common.optimizer_config(lr=1e-5, warmup_steps=0, weight_decay=0.0,
                                        schedule="constant"),
      mesh=common.mesh_config(),
      # How to run the model `init` (or the base built here) gives: dtype, remat, attention, ...
      model=common.runtime_config(),
  ))


def _hh_rlhf(c: ConfigDict) -> None:
  c.data.update(path=common.repo_data("hh_rlhf_harmless_test_500.jsonl"), max_prompt_len=96,
                eval_count=64)  # 64 held-out prompts: with 16 the mean score's noise hid the trend
  c.sampling.max_new_tokens = 32
  c.optimizer.lr = 5e-5
  c.train.update(steps=100, eval_every=20)


def _hh_rlhf_smollm2(c: ConfigDict) -> None:
  _hh_rlhf(c)
  c.init = "fetch:smollm2-135m-instruct"
  c.reward_training = reward.get_config("hh_rlhf_smollm2")
  c.peft.update(method="lora", r=8, alpha=16.0, dropout=0.0,
                targets=("q", "k", "v", "o", "gate", "up", "down"))
  # Prompts in the instruct model's chat template, as its reward model was trained on them.
  c.data.update(max_prompt_len=96, eval_count=32, chat_template=True)
  c.sampling.max_new_tokens = 32
  c.ppo.update(epochs=2, minibatches=2)
  # lr 3e-4: in 48 steps the adapter must move a few nats from the reference (bound 10) before
  # sampled answers score higher; docs/results.md compares the rates.
  c.optimizer.lr = 3e-4
  # Sized for 2 CPU cores: a step (8 rollouts of 32 tokens, 2 epochs x 2 minibatches) takes
  # about 30 s on quiet cores, 48 steps with their evals about 31 minutes.
  c.train.update(steps=48, global_batch=8, eval_every=6, checkpoint_every=12)


def _wordlist(c: ConfigDict) -> None:
  c.reward.function = "wordlist"
  c.value.init = "policy"
  # A small code model is enough to learn which tokens pay: 150 steps on the stdlib corpus.
  c.base = pretrain.get_config("test")
  c.base.model.update(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=344)
  c.base.data.update(stdlib_max_bytes=1_000_000, vocab_size=1024, tokenizer_train_bytes=1_000_000)
  c.base.train.update(steps=150, eval_every=0, checkpoint_every=150, sample_tokens=8)
  c.data.update(path="", max_prompt_len=12, eval_count=32)
  c.sampling.max_new_tokens = 12
  c.ppo.update(kl_coef=0.02, epochs=4, minibatches=2)
  c.optimizer.lr = 1e-3
  c.train.update(steps=40, global_batch=16, eval_every=10)


def _test(c: ConfigDict) -> None:
  _wordlist(c)
  c.base = pretrain.get_config("test")
  c.base.train.update(steps=40, eval_every=0, checkpoint_every=40, sample_tokens=4)
  c.data.update(max_prompt_len=8, eval_count=8, eval_draws=2)
  c.sampling.max_new_tokens = 8
  c.train.update(steps=20, global_batch=8, eval_every=10, log_every=5, checkpoint_every=10)


PRESETS = {"hh_rlhf": _hh_rlhf, "hh_rlhf_smollm2": _hh_rlhf_smollm2, "wordlist": _wordlist,
           "test": _test}


def get_config(preset: str = "wordlist") -> ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/ppo.py; choose one of "
                     f"{sorted(PRESETS)}")
  c = base_config()
  PRESETS[preset](c)
  return c
