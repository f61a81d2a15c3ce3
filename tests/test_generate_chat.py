"""scripts/generate.py --chat: prompts go through the tokenizer's chat template (#18)."""

from __future__ import annotations

import pytest
import torch

from gguf_files import write_gguf
from research.data.chat_template import chat_prompt
from research.errors import ConfigError
from research.interop.gguf_import import gguf_to_hf_dir
from scripts import generate

transformers = pytest.importorskip("transformers")


def test_chat_greedy_tokens_equal_transformers_generate(tmp_path):
  hf_dir = gguf_to_hf_dir(write_gguf(tmp_path / "m.gguf", quant="Q8_0", seed=3), tmp_path / "hf")
  prompts, system = ["the tin", "he"], "a he"
  args = generate.build_parser().parse_args(
      ["--checkpoint", str(hf_dir), "--chat", "--system", system, "--max_new_tokens", "8"]
      + [f"--prompt={p}" for p in prompts])
  completions = generate.run(args)
  assert [c.prompt for c in completions] == prompts
  assert all(len(c.tokens) >= 4 for c in completions), completions  # more than a stop

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
  for prompt, c in zip(prompts, completions):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=8, do_sample=False,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    theirs = out[0, ids.shape[1]:].tolist()
    if theirs and theirs[-1] == tokenizer.eos_token_id:
      theirs = theirs[:-1]
    assert c.tokens == theirs


def test_plain_template_when_the_tokenizer_has_none(tmp_path):
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      str(gguf_to_hf_dir(write_gguf(tmp_path / "m.gguf"), tmp_path / "hf")))
  tokenizer.chat_template = None
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
  assert chat_prompt(messages, tokenizer) == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"


def test_system_needs_chat():
  args = generate.build_parser().parse_args(["--checkpoint", "x", "--prompt", "p", "--system", "s"])
  with pytest.raises(ConfigError, match="--system sets the system turn of a chat: add --chat"):
    generate.check_args(args)
