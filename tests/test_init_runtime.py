"""`--config.init=DIR` takes the architecture from DIR and the runtime fields (dtype, remat, ...)
from the config; what PEFT adds trains in float32 over a bfloat16 base."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research import sweeps
from research.data import tokenizer as tokenizer_lib
from research.models.config import ModelConfig
from research.models.peft import PeftConfig, cast_added, is_trainable_path
from research.stages import sft
from research.train import workdir as wd
from research.train.metrics import read_metrics

FACTS = [("apple", "red"), ("sky", "blue"), ("snow", "white"), ("grass", "green")]


@pytest.fixture(scope="module")
def hf_dir_and_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("init_runtime")
  records = [{"instruction": f"What color is the {t}?", "input": "", "output": f"The {t} is {c}."}
             for t, c in FACTS] * 4
  data = root / "data.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  texts = [r["instruction"] + " " + r["output"] for r in records]
  tokenizer = tokenizer_lib.train_bpe_tokenizer(texts * 8, 300, str(root / "tok"))
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  hf = root / "hf"
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf)
  tokenizer.save_pretrained(hf)
  return str(hf), str(data)


def test_init_honours_the_configs_runtime_fields(hf_dir_and_data, tmp_path, capsys):
  hf, data = hf_dir_and_data
  config = sweeps.resolve_config("configs/sft.py:test", [
      f"--config.init={hf}", f"--config.data.path={data}", "--config.model.dtype=bfloat16",
      "--config.model.param_dtype=bfloat16", "--config.model.remat_policy=full",
      "--config.train.steps=2", "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
      "--config.train.sample_tokens=1", "--config.train.async_checkpoints=false"])
  workdir = str(tmp_path / "run")
  out = sft.run(config, workdir)
  printed = capsys.readouterr().out
  assert "dtype='bfloat16' (checkpoint: 'float32')" in printed
  assert "remat_policy='full'" in printed

  saved = wd.read_model_config(workdir)
  assert (saved.dtype, saved.param_dtype, saved.remat_policy) == ("bfloat16", "bfloat16", "full")
  assert saved.hidden_size == 32 and saved.num_layers == 2  # the architecture is DIR's

  state = out["state"]
  frozen = {x.dtype for x in jax.tree.leaves(state.frozen)}
  trained = {x.dtype for x in jax.tree.leaves(state.params)}
  moments = {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim}
  assert frozen == {jnp.dtype("bfloat16")}
  assert trained == {jnp.dtype("float32")} and moments == {jnp.dtype("float32")}
  losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))


def test_cast_added_touches_only_added_params():
  params = {"embed": {"embedding": jnp.ones((4, 2), jnp.bfloat16)},
            "layers": {"attn": {"q": {"kernel": jnp.ones((2, 2), jnp.bfloat16)},
                                "q_lora": {"lora_a": jnp.ones((2, 1), jnp.bfloat16)}}},
            "score": {"kernel": jnp.ones((2, 1), jnp.bfloat16)}}
  out = cast_added(params, jnp.float32)
  flat = jax.tree_util.tree_flatten_with_path(out)[0]
  for path, x in flat:
    assert x.dtype == (jnp.float32 if is_trainable_path(path) else jnp.bfloat16), path
  assert PeftConfig(method="lora").param_dtype == "float32"
  assert ModelConfig().param_dtype == "float32"
