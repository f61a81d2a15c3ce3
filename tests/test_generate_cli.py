"""scripts/generate.py: greedy text equals transformers' `generate` on the same HF dir (EOS stops
included); PEFT run directories decode with their method; bad input is one `error:` line."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from research.data import stdlib_corpus, tokenizer as tokenizer_lib
from research.interop.hf_import import load_hf_checkpoint
from research.models.decoder import Decoder
from research.models.peft import PeftConfig, split_trainable
from research.sampling import SamplingConfig, generate
from research.train import workdir as wd
from research.train.checkpoints import Checkpointer
from scripts import generate as generate_cli

transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ("import os\n\nclass Reader:\n    def __init__(self", "def ")
NEW_TOKENS = 12
EOS_AT = 4  # prompt 0's greedy continuation is made to end with EOS as its 5th token


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "scripts/generate.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _blocks(stdout: str) -> list[str]:
  """The continuations of the text format: a header line, the text, a blank line, per prompt."""
  parts = re.split(r"^==> \[\d+\] .* <==\n", stdout, flags=re.M)
  assert parts[0] == "" and all(p.endswith("\n\n") for p in parts[1:]), stdout
  return [p[:-2] for p in parts[1:]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny random Llama beside a locally trained tokenizer (vocab = tokenizer), whose lm_head
  row for EOS is 1.05x the row of prompt 0's 5th greedy token: greedy decoding then emits EOS
  there (a random model would almost never emit it), so the EOS stop is exercised."""
  root = tmp_path_factory.mktemp("generate_cli")
  texts = [source for _, source in stdlib_corpus.stdlib_sources(200_000)]
  tokenizer = tokenizer_lib.train_bpe_tokenizer(texts, 512, str(root / "tok"))
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
  with torch.no_grad():
    free = model.generate(ids, do_sample=False, max_new_tokens=EOS_AT + 1, eos_token_id=None,
                          pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    head = model.lm_head.weight
    head[tokenizer.eos_token_id] = 1.05 * head[free[EOS_AT]]
  path = root / "llama"
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def hf_greedy(hf_dir) -> list[list[int]]:
  """transformers' greedy new tokens per prompt, one prompt at a time (no padding); after EOS
  transformers pads the row, so a row ends at its first EOS (kept)."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  out = []
  for prompt in PROMPTS:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
      seq = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS)
    new = seq[0, enc.input_ids.shape[1]:].tolist()
    out.append(new[:new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new
               else new)
  return out


def test_greedy_text_equals_transformers_generate(hf_dir, hf_greedy, tmp_path):
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  proc = _cli(f"--checkpoint={hf_dir}", f"--prompts_file={prompts_file}",
              f"--max_new_tokens={NEW_TOKENS}", "--temperature=0")
  assert proc.returncode == 0, proc.stderr
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  eos = tokenizer.eos_token_id
  # One row stops at EOS (made to, see hf_dir), one runs all its tokens.
  assert hf_greedy[0][-1] == eos and len(hf_greedy[0]) <= EOS_AT + 1
  assert eos not in hf_greedy[1] and len(hf_greedy[1]) == NEW_TOKENS
  want = [tokenizer.decode([t for t in new if t != eos]) for new in hf_greedy]
  assert _blocks(proc.stdout) == want


@pytest.mark.parametrize("args,needle", [
    (("--checkpoint={tmp}/missing", "--prompt=x"), "{tmp}/missing is not a directory"),
    (("--checkpoint={tmp}", "--prompts_file={tmp}/empty.txt"), "no prompts"),
])
def test_bad_input_is_one_error_line(tmp_path, args, needle):
  (tmp_path / "empty.txt").write_text("\n\n")
  proc = _cli(*(a.format(tmp=tmp_path) for a in args))
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr and proc.stdout == ""
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and needle.format(tmp=tmp_path) in errors[0], proc.stderr


def _merge(a: dict, b: dict) -> dict:
  return {**a, **{k: _merge(a[k], v) if isinstance(v, dict) and k in a else v
                  for k, v in b.items()}}


@pytest.fixture(scope="module")
def hf_params(hf_dir):
  return load_hf_checkpoint(hf_dir)


def _peft_workdir(hf_params, tokenizer, workdir: pathlib.Path, peft: PeftConfig):
  """A run directory of `peft` on the HF dir's weights with random PEFT params, as training saves
  one (trainable in `params`, the base in `frozen`); returns all params."""
  cfg, base = hf_params
  shapes = jax.eval_shape(lambda: Decoder(cfg, peft).init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 4), jnp.int32)))
  trainable, _ = split_trainable(nn.meta.unbox(shapes["params"]), peft)
  # Large enough to change the greedy tokens (LoRA's B starts at zero); numpy: no compile per leaf.
  rng = np.random.default_rng(1)
  trainable = jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32), trainable)
  wd.write_model_files(str(workdir), cfg, tokenizer, peft)
  with Checkpointer(wd.checkpoint_dir(str(workdir)), max_to_keep=1, async_save=False) as ckpt:
    ckpt.save(3, {"step": np.int32(3), "params": trainable, "frozen": base}, {}, force=True)
  return _merge(base, trainable)


@pytest.mark.parametrize("peft", [PeftConfig(method="prompt", num_virtual_tokens=3),
                                  PeftConfig(method="lora", r=2, targets=("q", "v", "down"))])
def test_peft_run_directory(hf_dir, hf_params, hf_greedy, tmp_path, capsys, peft):
  """In process (the subprocess test covers start-up): prompt tuning decodes with its soft prompt;
  LoRA, merged by the CLI, gives the tokens the unmerged adapters give."""
  tokenizer = tokenizer_lib.load_tokenizer(str(hf_dir))
  cfg, params = hf_params[0], _peft_workdir(hf_params, tokenizer, tmp_path / "run", peft)
  eos = tokenizer.eos_token_id
  ids = tokenizer(PROMPTS[1])["input_ids"]
  want = generate(params, cfg, [ids], SamplingConfig(max_new_tokens=8, stop_tokens=(eos,)),
                  tokenizer.pad_token_id, peft=peft)[0]
  assert want != hf_greedy[1][:8]  # the PEFT params change the base model's tokens
  assert generate_cli.main([f"--checkpoint={tmp_path / 'run'}", f"--prompt={PROMPTS[1]}",
                            "--max_new_tokens=8", "--step=3", "--format=jsonl"]) == 0
  (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert record["tokens"] == [t for t in want if t != eos]
  assert record["text"] == tokenizer.decode(record["tokens"])


def test_repetition_penalty_equals_transformers(hf_dir, hf_params, hf_greedy):
  """--repetition_penalty=1.5, greedy, both prompts in one left-padded batch: the tokens are
  transformers' `generate(repetition_penalty=1.5)` one prompt at a time (prompt tokens count as
  seen, padding does not), and they differ from plain greedy decoding."""
  tokenizer = tokenizer_lib.load_tokenizer(str(hf_dir))
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  want = []
  for prompt in PROMPTS:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
      seq = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS,
                           repetition_penalty=1.5, eos_token_id=None,
                           pad_token_id=tokenizer.pad_token_id)
    want.append(seq[0, enc.input_ids.shape[1]:].tolist())
  cfg, params = hf_params
  got = generate_cli.complete(params, cfg, PeftConfig(), tokenizer, PROMPTS,
                              max_new_tokens=NEW_TOKENS, temperature=0.0, top_k=0, top_p=1.0,
                              seed=0, stop_ids=set(), stop_strings=(), batch_size=2,
                              repetition_penalty=1.5)
  assert [c.tokens for c in got] == want
  assert want[1] != hf_greedy[1]  # the penalty changes what greedy decoding picks


def test_nonpositive_repetition_penalty_is_refused(tmp_path, capsys):
  assert generate_cli.main([f"--checkpoint={tmp_path}", "--prompt=x",
                            "--repetition_penalty=0"]) == 2
  err = capsys.readouterr().err
  assert "--repetition_penalty=0.0 must be > 0" in err and "Traceback" not in err
