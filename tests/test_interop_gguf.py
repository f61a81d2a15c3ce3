"""GGUF import: tiny llama.cpp-layout files load here exactly as transformers loads them (#18)."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gguf_files import CHAT_TEMPLATE, write_gguf
from research.errors import CheckpointError, ConfigError
from research.interop.gguf_import import gguf_tokenizer, load_gguf_checkpoint
from research.interop.hf_import import load_hf_checkpoint
from research.models.decoder import Decoder
from research.train import workdir as wd
from scripts import convert

transformers = pytest.importorskip("transformers")

CASES = {  # (arch, matrices' type, tied embeddings)
    "llama_f32_tied": ("llama", "F32", True),
    "llama_q8_0": ("llama", "Q8_0", False),
    "qwen2_f32": ("qwen2", "F32", False),
}


def _batch(vocab: int):
  """[4, 12] tokens with left and right padding, and the positions transformers derives."""
  tokens = np.random.default_rng(0).integers(0, vocab, (4, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  mask[2, -4:] = 0
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return tokens, mask, positions


def _reference_logits(path: pathlib.Path, tokens, mask, positions) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long(),
                 attention_mask=torch.from_numpy(mask).long(),
                 position_ids=torch.from_numpy(positions).long()).logits.numpy()


def _our_logits(cfg, params, tokens, mask, positions) -> np.ndarray:
  logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                                 jnp.asarray(positions))
  return np.asarray(logits)


def _max_diff(a, b, mask) -> float:
  real = mask.astype(bool)
  return float(np.abs(a[real] - b[real]).max())


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_logits_equal_transformers(case, tmp_path):
  arch, quant, tie = CASES[case]
  path = write_gguf(tmp_path / f"{case}.gguf", arch=arch, quant=quant, tie=tie,
                    rope_theta=1e5 if arch == "llama" else 1e6)
  cfg, params = load_gguf_checkpoint(path)
  assert (cfg.hf_architecture, cfg.tie_embeddings, cfg.attention_bias) == (
      arch, tie, arch == "qwen2")
  batch = _batch(cfg.vocab_size)
  ours, theirs = _our_logits(cfg, params, *batch), _reference_logits(path, *batch)
  assert _max_diff(ours, theirs, batch[1]) < 1e-4


def test_convert_from_gguf_to_hf_dir_and_workdir(tmp_path):
  """Both outputs of `convert from-gguf` hold the same weights, tokenizer and chat template."""
  path = write_gguf(tmp_path / "m.gguf", quant="Q8_0", name="Mistral tiny")
  cfg, params = load_gguf_checkpoint(path)
  batch = _batch(cfg.vocab_size)
  expected = _our_logits(cfg, params, *batch)
  assert convert.main(["from-gguf", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
  assert convert.main(["from-gguf", str(path), str(tmp_path / "run")]) == 0

  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["model_type"] == "mistral"  # llama.cpp writes Mistral as llama; the name says
  hf_cfg, hf_params = load_hf_checkpoint(tmp_path / "hf")
  run_cfg, run_params, tok_dir, _ = wd.load_model(str(tmp_path / "run"))
  for c, p in ((hf_cfg, hf_params), (run_cfg, run_params)):
    assert c.replace(hf_architecture="mistral") == cfg.replace(hf_architecture="mistral")
    np.testing.assert_array_equal(_our_logits(c, p, *batch), expected)

  messages = [{"role": "user", "content": "the tin"}]
  want = gguf_tokenizer(path).apply_chat_template(messages, add_generation_prompt=True)
  for tok in (tmp_path / "hf", tok_dir):
    loaded = transformers.AutoTokenizer.from_pretrained(str(tok))
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == want
    assert (loaded.eos_token_id, loaded.bos_token_id) == (2, 1)
  # The HF dir is what transformers itself reads as the same model.
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                             dtype=torch.float32)
  tokens, mask, positions = batch
  with torch.no_grad():
    logits = theirs(input_ids=torch.from_numpy(tokens).long(),
                    attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(positions).long()).logits.numpy()
  assert _max_diff(expected, logits, mask) < 1e-4
  # An existing HF dir is never replaced without --overwrite.
  assert convert.main(["from-gguf", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 2


def test_unknown_architecture_is_one_clear_error(tmp_path, capsys):
  path = write_gguf(tmp_path / "phi.gguf", arch="phi3")
  with pytest.raises(ConfigError, match=r"GGUF architecture 'phi3' is not supported; supported: "
                                        r"\['gemma2', 'gemma3', 'llama', 'qwen2'.*\]"):
    load_gguf_checkpoint(path)
  assert convert.main(["from-gguf", str(path), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "phi3" in err and "\n" not in err
  assert not (tmp_path / "out").exists()


def test_unsupported_quantisation_and_tensors_are_named(tmp_path):
  with pytest.raises(CheckpointError, match=r"quantisation type \['Q8_1'\].*supported: F32"):
    load_gguf_checkpoint(write_gguf(tmp_path / "q81.gguf", quant="Q8_1"))
  mystery = {"blk.0.mystery.weight": np.ones(8, np.float32)}
  with pytest.raises(CheckpointError, match=r"no place for: \['blk.0.mystery.weight'\]"):
    load_gguf_checkpoint(write_gguf(tmp_path / "mystery.gguf", extra_tensors=mystery))
  with pytest.raises(CheckpointError, match="does not exist"):
    load_gguf_checkpoint(tmp_path / "missing.gguf")
