"""Qwen3 beyond its HF checkpoints (tests/test_interop_sliding.py): a LoRA run's PEFT adapter loads
in `peft` on the exported base with the merged model's logits, and a llama.cpp-layout GGUF file
imports exactly as transformers loads it (q/k norms, head_dim 128 beside hidden 64)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gguf_files import write_gguf
from research.interop.gguf_import import load_gguf_checkpoint
from research.models.config import ModelConfig
from research.models.peft import LORA_TARGETS, PeftConfig
from scripts import convert
from test_interop_gguf import _batch, _max_diff, _our_logits, _reference_logits
from test_peft import _auto, _hf_logits, _logits, _params, _write_run

transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

# head_dim 12 with hidden 32 over 4 heads: q/k/v's features are not the hidden size.
CFG = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=12, mlp_dim=48, rms_norm_eps=1e-5, qk_norm=True, bos_token_id=1,
                  eos_token_id=2, hf_architecture="qwen3")
LORA = PeftConfig(method="lora", r=4, alpha=8.0, targets=LORA_TARGETS)


def test_lora_adapter_loads_in_peft_with_the_merged_models_logits(tmp_path):
  params = _params(CFG, LORA, seed=5)
  q_norm = np.asarray(params["layers"]["attn"]["q_norm"]["scale"])
  assert q_norm.shape == (2, 12) and np.abs(q_norm - 1).max() > 0.05  # its export matters too
  run = tmp_path / "run"
  _write_run(run, CFG, LORA, params)
  assert convert.main(["to-hf", str(run), str(tmp_path / "merged")]) == 0
  assert convert.main(["to-peft", str(run), str(tmp_path / "adapter")]) == 0
  config = json.loads((tmp_path / "adapter" / "base" / "config.json").read_text())
  assert config["model_type"] == "qwen3" and config["head_dim"] == 12
  ours = _logits(CFG, LORA, params)
  merged = _hf_logits(_auto(tmp_path / "merged"))
  base_model = _auto(tmp_path / "adapter" / "base")
  base = _hf_logits(base_model)
  with_adapter = _hf_logits(peft_lib.PeftModel.from_pretrained(base_model,
                                                               str(tmp_path / "adapter")))
  np.testing.assert_allclose(merged, ours, atol=1e-4, rtol=0)
  np.testing.assert_allclose(with_adapter, merged, atol=1e-4, rtol=0)
  assert np.abs(base - ours).max() > 1e-2  # the adapter is loaded and matters


def test_gguf_qwen3_imports_as_transformers_loads_it(tmp_path):
  path = write_gguf(tmp_path / "qwen3.gguf", arch="qwen3", head_dim=128, rope_theta=1e6)
  cfg, params = load_gguf_checkpoint(path)
  assert (cfg.hf_architecture, cfg.qk_norm, cfg.resolved_head_dim, cfg.attention_bias) == (
      "qwen3", True, 128, False)
  assert cfg.sliding_window is None
  batch = _batch(cfg.vocab_size)
  assert _max_diff(_our_logits(cfg, params, *batch), _reference_logits(path, *batch),
                   batch[1]) < 1e-4
