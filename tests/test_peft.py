"""LoRA: zero-B init, merge == unmerged, and the PEFT export (`convert to-peft`) giving the same
logits in transformers + peft as the merged export (`convert to-hf`) and as our own decoder."""

from __future__ import annotations

import dataclasses
import gc
import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from research.errors import CheckpointError, ConfigError
from research.interop.hf_import import read_safetensors_dir
from research.interop.peft_export import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_layout,
                                          lora_tensors)
from research.models.config import ModelConfig
from research.models.decoder import Decoder, unstack_layers
from research.models.peft import LORA_TARGETS, PeftConfig, merge_lora, split_trainable, strip_peft
from research.train import workdir as wd
from research.train.checkpoints import Checkpointer
from scripts import convert

transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

# GQA (4 query heads over 2 kv heads) with head_dim 8, so q/k/v/o have two-axis head features.
CFG = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=48, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LORA = PeftConfig(method="lora", r=4, alpha=8.0, dropout=0.05, targets=LORA_TARGETS)
RSLORA = PeftConfig(method="lora", r=4, alpha=6.0, targets=LORA_TARGETS, rslora=True)
TOKENS = np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 11)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _init(cfg: ModelConfig, peft: PeftConfig):
  return jax.jit(lambda key: nn.meta.unbox(Decoder(cfg, peft).init(
      key, jnp.zeros((1, 8), jnp.int32))["params"]))


@functools.lru_cache(maxsize=None)
def _apply(cfg: ModelConfig, peft: PeftConfig):
  return jax.jit(lambda params: Decoder(cfg, peft).apply({"params": params},
                                                         jnp.asarray(TOKENS))[0])


def _params(cfg: ModelConfig, peft: PeftConfig, seed: int, random_b: bool = True) -> dict:
  """Decoder params with (when `random_b`) non-zero LoRA B and non-unit norms, so LoRA matters."""
  # One compiled init for configs of the same param shapes (scale and dropout change no shape).
  shapes_of = PeftConfig(method=peft.method, r=peft.r, targets=peft.targets,
                         num_virtual_tokens=peft.num_virtual_tokens, adapter_dim=peft.adapter_dim)
  params = _init(cfg, shapes_of)(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile once per shape

  def edit(path, x):
    name = path[-1].key
    if name == "lora_b" and random_b:
      return (0.2 * rng.standard_normal(x.shape)).astype(x.dtype)
    if name == "scale":
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(x.dtype)
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(edit, params)


def _merge(params: dict, peft: PeftConfig) -> dict:
  return jax.jit(lambda p: merge_lora(p, peft))(params)


def _zero_params(cfg: ModelConfig, peft: PeftConfig) -> dict:
  """Params of the right tree and shapes (zeros, from shapes alone: nothing is compiled)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(Decoder(cfg, peft).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _logits(cfg: ModelConfig, peft: PeftConfig, params: dict) -> np.ndarray:
  # Jitted and cached per config: eager flax runs op by op, several times slower on a small CPU.
  return np.asarray(_apply(cfg, peft)(params))


def _write_run(workdir: pathlib.Path, cfg: ModelConfig, peft: PeftConfig, params: dict) -> None:
  """A run directory as training leaves it: configs + a checkpoint of (trainable, frozen)."""
  wd.write_model_files(str(workdir), cfg, None, peft)
  trainable, frozen = split_trainable(params, peft)
  state = {"step": jnp.asarray(5, jnp.int32), "params": trainable}
  if frozen:
    state["frozen"] = frozen
  with Checkpointer(wd.checkpoint_dir(str(workdir)), 1, async_save=False) as ckpt:
    ckpt.save(5, state, {"model_config": cfg.to_dict()}, force=True)
    ckpt.wait()


def _hf_logits(model) -> np.ndarray:
  model.eval()
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _auto(path) -> torch.nn.Module:
  return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@pytest.fixture(autouse=True)
def _finalise_abandoned_reads():
  """A restore that fails (a rank mismatch, on purpose) leaves orbax's other reads as coroutines
  that were never awaited; collected later, their warnings would land in another test's stderr."""
  yield
  gc.collect()


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  return lines[0]


def test_lora_b_is_zero_at_init_so_the_model_is_the_base():
  params = _params(CFG, LORA, seed=1, random_b=False)
  bs = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if p[-1].key == "lora_b"]
  assert len(bs) == len(LORA_TARGETS)
  assert all(not np.any(np.asarray(b)) for b in bs)
  np.testing.assert_array_equal(_logits(CFG, LORA, params),
                                _logits(CFG, PeftConfig(), strip_peft(params)))


def test_merge_lora_equals_applying_lora_unmerged():
  # (rslora's merge is checked end to end below: the merged export against our unmerged logits)
  params = _params(CFG, LORA, seed=2)
  with_lora = _logits(CFG, LORA, params)
  merged = _merge(params, LORA)
  assert merged.keys() == strip_peft(params).keys()
  np.testing.assert_allclose(_logits(CFG, PeftConfig(), merged), with_lora, atol=1e-5, rtol=0)
  # The LoRA really changes the function (else this test could not fail).
  assert np.abs(_logits(CFG, PeftConfig(), strip_peft(params)) - with_lora).max() > 1e-2
  # Unrolled layers (scan_layers=False) merge to the same kernels and export the same tensors.
  unrolled = unstack_layers(params, CFG.num_layers)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0),
               _merge(unrolled, LORA), unstack_layers(merged, CFG.num_layers))
  a, b = lora_tensors(unrolled, CFG, LORA), lora_tensors(params, CFG, LORA)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
  """Per LoRA config: its params and run dir, exported by `convert to-hf` and `convert to-peft`."""
  root = tmp_path_factory.mktemp("peft")
  out = {}
  for seed, (name, peft) in enumerate((("lora", LORA), ("rslora", RSLORA))):
    params = _params(CFG, peft, seed=10 + seed)
    run = root / f"{name}_run"
    _write_run(run, CFG, peft, params)
    assert convert.main(["to-hf", str(run), str(root / f"{name}_merged")]) == 0
    assert convert.main(["to-peft", str(run), str(root / f"{name}_adapter")]) == 0
    out[name] = dict(peft=peft, params=params, run=run, merged=root / f"{name}_merged",
                     adapter=root / f"{name}_adapter")
  return out


@pytest.mark.parametrize("name", ["lora", "rslora"])
def test_peft_adapter_gives_the_logits_of_the_merged_export_and_of_ours(name, exports):
  e = exports[name]
  peft, adapter = e["peft"], e["adapter"]
  base_dir = adapter / "base"
  config = json.loads((adapter / ADAPTER_CONFIG).read_text())
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"],
          config["bias"]) == (peft.r, peft.alpha, peft.dropout, peft.rslora, "none")
  assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"]
  assert config["base_model_name_or_path"] == str(base_dir.absolute())

  ours = _logits(CFG, peft, e["params"])
  merged = _hf_logits(_auto(e["merged"]))
  base_model = _auto(base_dir)
  base = _hf_logits(base_model)
  model = peft_lib.PeftModel.from_pretrained(base_model, str(adapter))
  with_adapter = _hf_logits(model)
  np.testing.assert_allclose(merged, ours, atol=1e-4, rtol=0)
  np.testing.assert_allclose(with_adapter, ours, atol=1e-4, rtol=0)
  np.testing.assert_allclose(with_adapter, merged, atol=1e-4, rtol=0)
  assert np.abs(base - ours).max() > 1e-2  # the adapter is loaded and matters

  # Tensor by tensor: merged weight == base weight + scale * lora_B @ lora_A, in HF's layout.
  tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
  assert len(tensors) == 2 * len(LORA_TARGETS) * CFG.num_layers
  merged_w, base_w = read_safetensors_dir(e["merged"]), read_safetensors_dir(base_dir)
  for spec in lora_layout(CFG, peft):
    for i in range(CFG.num_layers):
      hf = spec.hf_module.format(i=i)
      a = tensors[f"base_model.model.{hf}.lora_A.weight"]
      b = tensors[f"base_model.model.{hf}.lora_B.weight"]
      assert a.shape == (peft.r, int(np.prod(spec.in_shape)))
      assert b.shape == (int(np.prod(spec.out_shape)), peft.r)
      np.testing.assert_allclose(base_w[f"{hf}.weight"] + peft.lora_scale * (b @ a),
                                 merged_w[f"{hf}.weight"], atol=1e-6, rtol=0)


def test_to_peft_references_an_existing_base_and_refuses_another(exports, tmp_path, capsys):
  e = exports["lora"]
  base_dir = e["adapter"] / "base"
  out = tmp_path / "adapter2"
  assert convert.main(["to-peft", str(e["run"]), str(out), "--base-dir", str(base_dir)]) == 0
  capsys.readouterr()
  assert not (out / "base").exists()  # referenced, not rewritten
  config = json.loads((out / ADAPTER_CONFIG).read_text())
  assert config["base_model_name_or_path"] == str(base_dir.absolute())
  assert (out / ADAPTER_WEIGHTS).read_bytes() == (e["adapter"] / ADAPTER_WEIGHTS).read_bytes()
  # Again into the same OUT_DIR: refused without --overwrite, replaced with it.
  assert convert.main(["to-peft", str(e["run"]), str(out), "--base-dir", str(base_dir)]) == 2
  assert "--overwrite" in _one_error_line(capsys)
  assert convert.main(["to-peft", str(e["run"]), str(out), "--base-dir", str(base_dir),
                       "--overwrite"]) == 0
  capsys.readouterr()
  # Another run's base (same shapes, other weights) is not this adapter's base.
  other = exports["rslora"]["adapter"] / "base"
  assert convert.main(["to-peft", str(e["run"]), str(tmp_path / "adapter3"), "--base-dir",
                       str(other)]) == 2
  line = _one_error_line(capsys)
  assert str(other) in line and "not this run's frozen base" in line
  assert not (tmp_path / "adapter3").exists()
  # A --base-dir that does not exist yet gets the base exported there.
  new_base = tmp_path / "bases" / "b1"
  assert convert.main(["to-peft", str(e["run"]), str(tmp_path / "adapter4"), "--base-dir",
                       str(new_base)]) == 0
  assert (new_base / "config.json").is_file() and (new_base / "model.safetensors").is_file()


def test_adapter_rank_other_than_the_config_names_the_tensor_and_both_ranks(tmp_path, capsys):
  params = _params(CFG, LORA, seed=3)  # r=4
  run = tmp_path / "run"
  _write_run(run, CFG, LORA, params)
  config_path = run / wd.PEFT_CONFIG
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 8}))
  with pytest.raises(CheckpointError) as err:
    wd.load_run(str(run))
  message = str(err.value)
  assert "layers/attn/k_lora/lora_a has rank 4" in message and "says r=8" in message
  assert convert.main(["to-peft", str(run), str(tmp_path / "out")]) == 2
  assert "rank 4" in _one_error_line(capsys)
  assert not (tmp_path / "out").exists()
  # The exporter itself checks every LoRA shape against the config before converting any.
  peft8 = dataclasses.replace(LORA, r=8)
  with pytest.raises(CheckpointError, match=r"layers/attn/q_lora/lora_a has rank 4 .* r=8"):
    lora_tensors(params, CFG, peft8)
  with pytest.raises(CheckpointError, match=r"layers_0/attn/q_lora/lora_a has rank 4 .* r=8"):
    lora_tensors(unstack_layers(params, CFG.num_layers), CFG, peft8)


def test_lora_targets_that_match_no_module_are_a_config_error():
  with pytest.raises(ConfigError, match=r"qq.*match no module"):
    PeftConfig(method="lora", targets=("qq",))
  with pytest.raises(ConfigError, match=r"'up_proj'"):
    PeftConfig(method="lora", targets=("q", "up_proj"))


@pytest.mark.parametrize("peft", [PeftConfig(method="prompt", num_virtual_tokens=3),
                                  PeftConfig(method="adapter", adapter_dim=4)],
                         ids=["prompt", "adapter"])
def test_to_hf_and_to_peft_refuse_runs_without_lora(peft, tmp_path, capsys):
  run = tmp_path / "run"
  _write_run(run, CFG, peft, _zero_params(CFG, peft))
  assert convert.main(["to-hf", str(run), str(tmp_path / "hf")]) == 2
  line = _one_error_line(capsys)
  assert f"peft.method={peft.method!r}" in line and "cannot be merged" in line
  assert convert.main(["to-peft", str(run), str(tmp_path / "adapter")]) == 2
  assert "LoRA adapters only" in _one_error_line(capsys)
  assert not (tmp_path / "hf").exists() and not (tmp_path / "adapter").exists()
