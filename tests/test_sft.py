"""SFT from one tiny base: each method trains only its own params, LoRA's optimizer state covers
only LoRA, held-out loss falls, and bad records stop the CLI with one error line before anything
is written."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from configs.sft import get_config
from research.data import tokenizer as tokenizer_lib
from research.data.chat_template import plain_segments
from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.models.peft import LORA_TARGETS
from research.stages import sft
from research.stages.lm import decoder_init
from research.train import workdir as wd
from research.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 12 facts, asked 4 ways (alpaca) and once as chat: held-out records ask seen facts in new ways.
FACTS = [("apple", "red"), ("banana", "yellow"), ("grass", "green"), ("sky", "blue"),
         ("snow", "white"), ("coal", "black"), ("orange", "orange"), ("plum", "purple"),
         ("lemon", "yellow"), ("cherry", "red"), ("ocean", "blue"), ("leaf", "green")]
QUESTIONS = ["What color is the {t}?", "Tell me the colour of the {t}.",
             "Which color does the {t} have?", "Name the color of the {t}."]
METHOD_STEPS = 4
LORA_STEPS = 30
# The stated bar: LoRA (r=8, every projection, lr 1e-2) cuts the held-out response loss by at
# least this fraction in LORA_STEPS steps (measured: 3.77 -> 1.35, a 64% cut).
LORA_MIN_LOSS_DROP = 0.3


def _alpaca() -> list[dict]:
  return [{"instruction": q.format(t=t), "input": "", "output": f"The {t} is {c}."}
          for t, c in FACTS for q in QUESTIONS]


def _chat() -> list[dict]:
  return [{"messages": [{"role": "system", "content": "Answer in one short sentence."},
                        {"role": "user", "content": f"{t}: which color?"},
                        {"role": "assistant", "content": f"The {t} is {c}."}]}
          for t, c in FACTS]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
  """data.path: an alpaca JSON-lines file and a chat JSON array."""
  root = tmp_path_factory.mktemp("sft_data")
  alpaca, chat = root / "alpaca.jsonl", root / "chat.json"
  alpaca.write_text("".join(json.dumps(r) + "\n" for r in _alpaca()))
  chat.write_text(json.dumps(_chat()))
  return f"{alpaca},{chat}"


def _pretrain(cfg: ModelConfig, texts: list[str], tokenizer: Any, steps: int) -> dict:
  """A plain next-token loop (no stage, no checkpoints): a base that knows the facts as text."""
  ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
  width = max(map(len, ids))
  tokens = np.full((len(ids), width), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(ids), width), np.float32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = 1.0
  model = Decoder(cfg)
  tx = optax.adam(1e-2)

  def loss_fn(p, x, m):
    logits = model.apply({"params": p}, x)[0][:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
    return (nll * m[:, 1:]).sum() / m[:, 1:].sum()

  @jax.jit  # init and the loop in one program: one compile of the forward pass, not two
  def train(key):
    p = nn.meta.unbox(model.init(key, tokens[:1])["params"])

    def step(carry, _):
      p, s = carry
      grads = jax.grad(loss_fn)(p, tokens, mask)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

  return train(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
  """One tiny base for every test: a tokenizer and a small decoder trained on the facts as plain
  sentences (not as Q/A), written as a step-0 run that `init` points to."""
  root = tmp_path_factory.mktemp("sft_base")
  sentences = [f"The {t} is {c}." for t, c in FACTS] + [f"I see the {t}." for t, _ in FACTS]
  # The tokenizer also sees the SFT text as rendered (role markers), so rows stay short.
  rendered = ["".join(s.text for s in plain_segments(r["messages"]))
              for r in _chat() + [{"messages": [{"role": "user", "content": r["instruction"]},
                                                {"role": "assistant", "content": r["output"]}]}
                                  for r in _alpaca()]]
  tokenizer = tokenizer_lib.train_bpe_tokenizer((sentences + rendered) * 4, 400,
                                                str(root / "tokenizer"))
  cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=64, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
  params = _pretrain(cfg, sentences, tokenizer, steps=60)
  workdir = root / "base"
  wd.write_initial_checkpoint(str(workdir), cfg, params, tokenizer=tokenizer)
  return {"dir": str(workdir), "params": jax.tree.map(np.asarray, params)}


def _config(base: dict, data: str, method: str, steps: int, eval_fraction: float = 0.0):
  c = get_config("test")
  c.init = base["dir"]
  c.data.update(path=data, seq_len=64, eval_fraction=eval_fraction, pack=method != "prompt")
  c.peft.update(method=method, r=8, alpha=16.0, dropout=0.0, targets=LORA_TARGETS,
                num_virtual_tokens=4 if method == "prompt" else 0,
                adapter_dim=8 if method == "adapter" else 0)
  c.train.update(steps=steps, eval_every=steps if eval_fraction else 0, checkpoint_every=0,
                 log_every=steps, sample_tokens=1, async_checkpoints=False)
  c.optimizer.update(lr=1e-2, warmup_steps=1)
  return c


_RUNS: dict[str, dict] = {}


@pytest.fixture
def run_method(base, data, tmp_path_factory):
  """method -> (final state, workdir) of one short SFT run from the shared base, run once."""
  def run(method: str) -> dict:
    if method not in _RUNS:
      workdir = str(tmp_path_factory.mktemp(f"sft_{method}") / "run")
      lora = method == "lora"
      config = _config(base, data, method, LORA_STEPS if lora else METHOD_STEPS,
                       eval_fraction=0.2 if lora else 0.0)
      _RUNS[method] = {**sft.run(config, workdir), "workdir": workdir}
    return _RUNS[method]
  return run


def _key(k: Any) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _flat(tree: Any) -> dict[str, np.ndarray]:
  """'a/b/c' -> host array, for params and optimizer states alike."""
  return {"/".join(map(_key, path)): np.asarray(jax.device_get(x))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fresh_trainable(base: dict, method: str) -> dict[str, np.ndarray]:
  """The trainable params a run of `method` starts from: its init, from the run's seed."""
  config = _config(base, "", method, METHOD_STEPS)
  cfg = wd.read_model_config(base["dir"])
  trainable, _ = jax.jit(decoder_init(cfg, sft.peft_from(config.peft)))(
      jax.random.PRNGKey(config.seed))
  return _flat(nn.meta.unbox(trainable))


@pytest.mark.parametrize("method", ["full", "lora", "prompt", "adapter"])
def test_each_method_trains_only_its_own_params(method, run_method, base):
  state = run_method("none" if method == "full" else method)["state"]
  base_flat = _flat(base["params"])
  trained, frozen = _flat(state.params), _flat(state.frozen)
  if method == "full":  # everything trains
    assert not frozen and trained.keys() == base_flat.keys()
    for name, x in trained.items():
      assert not np.array_equal(x, base_flat[name]), f"{name} did not train"
    return
  # The base is frozen bit for bit ...
  assert frozen.keys() == base_flat.keys()
  for name, x in frozen.items():
    assert x.dtype == base_flat[name].dtype and np.array_equal(x, base_flat[name]), name
  # ... and the method's own params, all of them, are what trained.
  modules = {"lora": [f"{t}_lora" for t in LORA_TARGETS], "prompt": ["soft_prompt"],
             "adapter": ["attn_adapter", "mlp_adapter"]}[method]
  assert {m for name in trained for m in modules if m in name.split("/")} == set(modules)
  fresh = _fresh_trainable(base, method)
  assert trained.keys() == fresh.keys()
  for name, x in trained.items():
    assert not np.array_equal(x, fresh[name]), f"{name} did not train"


def _bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_lora_optimizer_state_holds_only_lora_params(run_method):
  lora, full = run_method("lora")["state"], run_method("none")["state"]
  arrays = {name: x for name, x in _flat(lora.opt_state).items() if x.ndim}
  assert arrays and all("_lora/" in name for name in arrays), sorted(arrays)
  # Adam: two moments per trainable leaf, nothing for the frozen base.
  assert len(arrays) == 2 * len(jax.tree.leaves(lora.params))
  assert _bytes(arrays) == 2 * _bytes(lora.params)
  full_arrays = {name: x for name, x in _flat(full.opt_state).items() if x.ndim}
  assert _bytes(full_arrays) == 2 * _bytes(full.params)
  assert _bytes(arrays) < _bytes(full_arrays) / 4


def test_lora_held_out_loss_falls(run_method):
  out = run_method("lora")
  evals = [m for m in read_metrics(out["workdir"]) if "eval/loss" in m]
  assert [m["step"] for m in evals] == [0, LORA_STEPS]
  first, last = evals[0]["eval/loss"], evals[-1]["eval/loss"]
  assert last <= (1 - LORA_MIN_LOSS_DROP) * first, (first, last)


BAD_RECORDS = {
    "missing_field": ("bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}],
                      ("record 2", "'output'")),
    "empty_response": ("bad.jsonl", [{"instruction": "a", "output": "b"},
                                     {"instruction": "c", "output": "  "}],
                       ("record 2", "'output' is empty")),
    "unknown_role": ("bad.json", [{"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]},
                                  {"messages": [{"role": "narrator", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]}],
                     ("record 2", "messages[0].role", "'narrator'", "template does not know")),
}


@pytest.fixture(scope="module", autouse=True)
def _cli_processes(tmp_path_factory):
  """Starts every bad-record case through `python -m experiments.sft` when the module starts,
  side by side, so their start-up overlaps the in-process runs; `cli_errors` collects them."""
  root = tmp_path_factory.mktemp("sft_cli")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  procs = {}
  for case, (name, records, _) in BAD_RECORDS.items():
    (root / case).mkdir()
    path = root / case / name
    if name.endswith(".jsonl"):
      path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
      path.write_text(json.dumps(records))
    workdir = root / case / "run"
    cmd = [sys.executable, "-m", "experiments.sft", "--config=configs/sft.py:test",
           f"--workdir={workdir}", f"--config.data.path={path}"]
    procs[case] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True), path, workdir)
  yield procs
  for proc, _, _ in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def cli_errors(_cli_processes) -> dict:
  out = {}
  for case, (proc, path, workdir) in _cli_processes.items():
    _, stderr = proc.communicate(timeout=300)
    out[case] = (proc.returncode, stderr, path, workdir)
  return out


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_records_stop_the_cli_before_anything_is_written(case, cli_errors):
  rc, stderr, path, workdir = cli_errors[case]
  assert rc == 2, stderr
  assert "Traceback" not in stderr, stderr
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr
  for needle in (str(path), *BAD_RECORDS[case][2]):
    assert needle in lines[0], lines[0]
  ckpts = workdir / wd.CHECKPOINT_DIR
  assert not ckpts.exists() or not any(ckpts.iterdir())
  assert not (workdir / "base").exists()  # no base pretraining started either


def test_a_lora_sft_run_exports_as_a_peft_adapter(run_method, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from scripts import convert  # pylint: disable=import-outside-toplevel
  out = run_method("lora")
  assert convert.main(["to-peft", out["workdir"], str(tmp_path / "adapter")]) == 0
  tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  lora_a = np.asarray(out["state"].params["layers"]["attn"]["q_lora"]["lora_a"])  # [L, E, r]
  np.testing.assert_array_equal(
      tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"], lora_a[1].T)
  assert (tmp_path / "adapter" / "base" / "model.safetensors").is_file()


def test_huanhuan_records_read_and_fit_the_rows(shared_data, base, tmp_path):
  """The real alpaca file of the huanhuan presets (a subset): read, rendered, tokenized, packed."""
  from research.data import sft as sft_data  # pylint: disable=import-outside-toplevel
  records = json.loads((shared_data / "huanhuan.json").read_text(encoding="utf-8"))[:64]
  subset = tmp_path / "huanhuan_subset.json"
  subset.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
  read = sft_data.read_sft_records([str(subset)])
  assert len(read) == 64 and read[0]["messages"][-1]["role"] == "assistant"
  tokenizer = tokenizer_lib.load_tokenizer(str(pathlib.Path(base["dir"]) / wd.TOKENIZER_DIR))
  examples, report = sft_data.tokenize_sft(read, tokenizer, 256, "truncate_prompt_left")
  rows = sft_data.sft_rows(examples, 256, tokenizer.pad_token_id, pack=True)
  assert len(examples) > 0 and rows["loss_mask"].sum() > 0, report
