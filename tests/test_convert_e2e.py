"""End to end through scripts/convert.py: a model trained here generates in transformers exactly as
here; pretraining starts from an HF dir or a from-hf workdir at exactly the HF weights (#3)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from configs.pretrain import get_config
from research.data import loader, stdlib_corpus, tokenizer as tokenizer_lib
from research.interop.hf_export import export_hf
from research.interop.hf_import import read_safetensors_dir
from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.sampling import greedy_generate
from research.stages import pretrain, setup
from research.train import workdir as wd
from research.train.metrics import read_metrics
from scripts import convert

transformers = pytest.importorskip("transformers")

PROMPTS = ("import os\n\nclass Reader:\n    def __init__(self", "def ")
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory) -> tuple[str, str]:
  root = tmp_path_factory.mktemp("e2e_data")
  corpus = stdlib_corpus.write_stdlib_corpus(str(root / "stdlib.jsonl"), 300_000)
  texts = [json.loads(line)["text"] for line in open(corpus)]
  tokenizer_lib.train_bpe_tokenizer(texts, 512, str(root / "tok"))
  return corpus, str(root / "tok")


def _config(corpus: str, tokenizer: str = "", init: str = "", **train):
  c = get_config("test")
  c.init = init
  c.data.corpus = corpus
  c.data.tokenizer = tokenizer
  # No end-of-run samples: these tests generate themselves, and each compile costs seconds.
  c.train.update(checkpoint_every=0, sample_prompts=(), **train)
  return c


@pytest.fixture(scope="module")
def trained(corpus_and_tokenizer, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir trained 12 steps, its float32 export written by `convert to-hf`)."""
  corpus, tok = corpus_and_tokenizer
  root = tmp_path_factory.mktemp("e2e_trained")
  workdir, out = root / "run", root / "hf_f32"
  pretrain.run(_config(corpus, tok, steps=12, eval_every=0), str(workdir))
  assert wd.tokenizer_dir(str(workdir))  # the run saved its tokenizer beside the checkpoints
  assert convert.main(["to-hf", str(workdir), str(out)]) == 0
  return workdir, out


def _hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def test_trained_model_generates_the_same_in_transformers(trained):
  workdir, out = trained
  cfg, params, _, _ = wd.load_model(str(workdir))
  # On one device: the run's mesh replicates over 8 host devices, 8x the work on a small CPU.
  params = jax.tree.map(np.asarray, params)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
  assert len(ids[0]) > len(ids[1]) > 0
  run_tokenizer = tokenizer_lib.load_tokenizer(wd.tokenizer_dir(str(workdir)))
  assert ids == [run_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
  hf_config = json.loads((out / "config.json").read_text())
  assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (tokenizer.eos_token_id,
                                                                    tokenizer.pad_token_id)
  ours = greedy_generate(params, cfg, ids, NEW_TOKENS, pad_id=tokenizer.pad_token_id, eos_id=None)

  tokenizer.padding_side = "left"
  enc = tokenizer(list(PROMPTS), add_special_tokens=False, padding=True, return_tensors="pt")
  assert enc.input_ids.shape[1] == len(ids[0]) and enc.attention_mask[1, 0] == 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  # generation_config.json names EOS; without it HF runs all 16 steps as greedy_generate does.
  hf.generation_config.eos_token_id = None
  with torch.no_grad():
    gen = hf.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
  width = enc.input_ids.shape[1]
  theirs = gen.sequences[:, width:].tolist()
  assert theirs == ours, (tokenizer.batch_decode(theirs), tokenizer.batch_decode(ours))

  # An undertrained model's greedy text is repetitive, so the logits are compared too: HF's
  # step-by-step ones (KV cache) against this decoder's over the whole left-padded sequence.
  mask = torch.cat([enc.attention_mask, torch.ones(2, NEW_TOKENS, dtype=torch.long)], dim=1)
  apply = jax.jit(lambda p, t, s: Decoder(cfg).apply({"params": p}, t, s)[0])
  ours_btv = np.asarray(apply(params, jnp.asarray(gen.sequences.numpy(), jnp.int32),
                              jnp.asarray(mask.numpy(), jnp.int32)))
  steps_btv = torch.stack(gen.logits, dim=1).float().numpy()
  np.testing.assert_allclose(ours_btv[:, width - 1:-1], steps_btv, atol=1e-4, rtol=0)
  real = mask.numpy().astype(bool)
  np.testing.assert_allclose(ours_btv[real], _hf_logits(hf, gen.sequences, mask)[real], atol=1e-4,
                             rtol=0)


def test_bfloat16_export_of_trained_workdir(trained, tmp_path):
  workdir, f32 = trained
  out = tmp_path / "hf_bf16"
  assert convert.main(["to-hf", str(workdir), str(out), "--dtype", "bfloat16"]) == 0
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  hf = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert hf.dtype == torch.bfloat16
  assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
  # Each weight is the float32 one rounded to nearest even, as torch's .to(bfloat16) rounds.
  full, half = read_safetensors_dir(f32), read_safetensors_dir(out)
  assert sorted(full) == sorted(half)
  for name, x in full.items():
    assert half[name].dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(half[name], x.astype(ml_dtypes.bfloat16), err_msg=name)
  ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(out)(PROMPTS[0])["input_ids"]])
  ref = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(f32, dtype=torch.float32),
                   ids, torch.ones_like(ids))
  logits = _hf_logits(hf, ids, torch.ones_like(ids))
  assert np.isfinite(logits).all() and np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()


@pytest.fixture(scope="module")
def hf_dir(corpus_and_tokenizer, tmp_path_factory) -> pathlib.Path:
  """A tiny random Llama with the locally trained tokenizer saved beside it (vocab = tokenizer).

  Its shapes are the `test` preset's (compiles are shared with the other runs here); rope_theta
  and rms_norm_eps are not, which shows whose config a run started from it uses.
  """
  _, tok_dir = corpus_and_tokenizer
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
      initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # norm scales start at 1: random ones make their import count too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
  path = tmp_path_factory.mktemp("e2e_hf") / "llama"
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path


def _hf_eval_loss(hf_dir: pathlib.Path, corpus: str, config) -> float:
  """The run's step-0 eval loss computed with transformers: each packed segment on its own."""
  tokenizer = tokenizer_lib.load_tokenizer(str(hf_dir))
  texts = pretrain.corpus_texts(config, "")
  _, rows = loader.pretraining_rows(texts, tokenizer, config.data.seq_len,
                                    config.data.eval_fraction, config.seed)
  batches = loader.eval_batches(rows, config.train.eval_batch_size)[:config.train.max_eval_batches]
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  num = den = 0.0
  for batch in batches:
    for r in range(batch["inputs"].shape[0]):
      for seg in set(batch["segment_ids"][r].tolist()) - {0}:
        at = batch["segment_ids"][r] == seg
        assert (batch["positions"][r][at] == np.arange(at.sum())).all()
        with torch.no_grad():
          logits = model(torch.from_numpy(batch["inputs"][r][at][None]).long()).logits[0]
        nll = torch.nn.functional.cross_entropy(
            logits.double(), torch.from_numpy(batch["targets"][r][at]).long(), reduction="none")
        mask = batch["loss_mask"][r][at]
        num += float((nll.numpy() * mask).sum())
        den += float(mask.sum())
  assert den > 100  # enough held-out tokens for the comparison to mean something
  return num / den


def _losses(workdir: pathlib.Path, key: str) -> dict[int, float]:
  return {m["step"]: m[key] for m in read_metrics(workdir) if key in m}


def test_pretraining_starts_from_hf_dir_and_from_hf_workdir(corpus_and_tokenizer, hf_dir,
                                                            tmp_path):
  corpus, _ = corpus_and_tokenizer
  hf_tensors = read_safetensors_dir(hf_dir)
  # from-hf writes a workdir; both kinds of `init` give the HF weights bit for bit.
  converted = tmp_path / "from_hf"
  assert convert.main(["from-hf", str(hf_dir), str(converted)]) == 0
  mesh = setup.mesh_from(_config(corpus))
  rules = setup.rules_from(_config(corpus))
  for init in (hf_dir, converted):
    cfg, params, tok = setup.load_init_weights(str(init), mesh, rules)
    assert tok is not None and cfg.vocab_size == 512
    layers = params["layers"]
    k_kernel = layers["attn"]["k"]["kernel"][0]  # [embed, kv_heads, head_dim]
    for name, ours in {
        "model.embed_tokens.weight": params["embed"]["embedding"],
        "lm_head.weight": params["lm_head"]["kernel"].T,
        "model.norm.weight": params["final_norm"]["scale"],
        "model.layers.1.input_layernorm.weight": layers["attn_norm"]["scale"][1],
        "model.layers.1.mlp.down_proj.weight": layers["mlp"]["down"]["kernel"][1].T,
        "model.layers.0.self_attn.k_proj.weight": k_kernel.reshape(64, 32).T,
    }.items():
      np.testing.assert_array_equal(np.asarray(ours), hf_tensors[name], err_msg=f"{init}: {name}")

  config = _config(corpus, init=str(hf_dir), steps=3, eval_every=3)
  config.optimizer.warmup_steps = 1
  out = pretrain.run(config, str(tmp_path / "from_hf_dir"))
  # The init model's config, not the preset's (rope_theta 10000, rms_norm_eps 1e-6).
  assert (out["model_config"].rope_theta, out["model_config"].rms_norm_eps) == (500000.0, 1e-5)
  evals = _losses(tmp_path / "from_hf_dir", "eval/loss")
  np.testing.assert_allclose(evals[0], _hf_eval_loss(hf_dir, corpus, config), rtol=1e-5)
  assert evals[3] < evals[0]  # and it trains from there

  # The from-hf workdir starts the same run: step 1's train loss is taken at the starting weights
  # on the first batch, which the same tokenizer and seed make the same batch.
  config = _config(corpus, init=str(converted), steps=1, eval_every=0)
  config.optimizer.warmup_steps = 1
  pretrain.run(config, str(tmp_path / "from_workdir"))
  assert (_losses(tmp_path / "from_workdir", "train/loss")[1] ==
          _losses(tmp_path / "from_hf_dir", "train/loss")[1])


@pytest.mark.parametrize("dtype,max_shard_bytes", [("float32", 10**9), ("bfloat16", 10**9),
                                                   ("float16", 40_000)])
def test_streamed_safetensors_files_equal_save_file(dtype, max_shard_bytes, tmp_path):
  """The exporter writes each file tensor by tensor; the bytes are what save_file would write."""
  cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    mlp_dim=48, hf_architecture="qwen2")  # qwen2: zero biases are written too
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0),
                                                                 jnp.zeros((1, 4), jnp.int32))))
  out = export_hf(params, cfg, tmp_path / "out", dtype=dtype, max_shard_bytes=max_shard_bytes)
  files = sorted(out.glob("*.safetensors"))
  assert (len(files) == 1) == (max_shard_bytes > 10**6), files
  for path in files:
    with safe_open(str(path), framework="numpy") as f:
      tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), path.name
