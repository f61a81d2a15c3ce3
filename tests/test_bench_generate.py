"""scripts/bench_generate.py --grpo: the GRPO rollout shape, ours vs transformers' `generate`; what
each side is credited with is the tokens it generated up to and including each row's EOS."""

from __future__ import annotations

import numpy as np
import pytest

from gguf_files import write_gguf
from research.interop.gguf_import import gguf_to_hf_dir
from scripts import bench_generate

transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

EOS = 2  # gguf_files' tokenizer: <|im_end|>


def recount(tokens_nw, stops) -> list[int]:
  """Per row, the tokens up to and including the first stop token; the row's width without one."""
  out = []
  for row in np.asarray(tokens_nw).tolist():
    hits = [i for i, t in enumerate(row) if t in stops]
    out.append(hits[0] + 1 if hits else len(row))
  return out


def test_eos_lengths_and_counts_by_hand():
  tokens = np.array([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 7, 2]])
  assert bench_generate.eos_lengths(tokens, (2,)).tolist() == [2, 4, 1, 4]
  assert bench_generate.eos_lengths(tokens, ()).tolist() == [4, 4, 4, 4]
  counts = bench_generate.rollout_counts(tokens, [2, 4, 1, 4], (2,))
  assert counts == dict(rows=4, tokens=11, stopped=3, mean_length=2.75, max_length=4)
  assert bench_generate.rollout_counts(tokens, [4] * 4, ())["stopped"] == 0


@pytest.fixture
def eos_heavy_model(tmp_path):
  """A tiny random Llama with a chat-template tokenizer, its EOS logit scaled up so that sampled
  rows stop early often (and not always: its sign follows the hidden state)."""
  hf_dir = gguf_to_hf_dir(write_gguf(tmp_path / "m.gguf", seed=1), tmp_path / "hf")
  path = hf_dir / "model.safetensors"
  weights = safetensors_numpy.load_file(str(path))
  weights["lm_head.weight"][EOS] *= -30.0
  safetensors_numpy.save_file(weights, str(path), metadata={"format": "pt"})
  return hf_dir


def test_grpo_counts_tokens_up_to_each_rows_eos(eos_heavy_model):
  b, g, n = 2, 8, 8
  args = bench_generate.build_parser().parse_args(
      ["--grpo", f"--model={eos_heavy_model}", f"--prompts={b}", f"--group_size={g}",
       f"--max_new_tokens={n}", "--repeats=1"])
  bench = bench_generate.GRPOBench(args, str(eos_heavy_model))
  assert bench.rows == b * g and bench.stops == (EOS,) and bench.max_new_tokens == n
  # The preset's prompts, through the chat template, each repeated G times in a row.
  texts = bench.tokenizer.batch_decode(bench.tokens_np[::g], skip_special_tokens=False)
  assert all("How many" in t and t.endswith("<|im_start|>assistant\n") for t in texts), texts
  assert (bench.tokens_np.reshape(b, g, -1) == bench.tokens_np[::g, None]).all()

  eos = bench_generate.bench_grpo_variant(bench, eos=True, repeats=1)
  for side in ("ours", "theirs"):
    r = eos[side]
    tokens_nw, lengths_n = r["last"]
    assert tokens_nw.shape[0] == b * g and tokens_nw.shape[1] <= n
    assert lengths_n.tolist() == recount(tokens_nw, (EOS,)), side
    stopped = [EOS in row for row in tokens_nw.tolist()]
    assert 0 < sum(stopped) < b * g, (side, tokens_nw)  # both kinds of rows are counted
    assert r["calls"][0]["tokens"] == r["tokens"] == sum(lengths_n.tolist())
    assert r["tokens"] < b * g * n
    assert r["mean_length"] == pytest.approx(r["tokens"] / (b * g))
    assert r["stopped"] == pytest.approx(sum(stopped) / (b * g))
    assert r["tps"] == r["tps_calls"][0] > 0
  # Ours pads after a row's EOS, as the GRPO stage masks it.
  ours_nw, ours_n = eos["ours"]["last"]
  for row, length in zip(ours_nw.tolist(), ours_n.tolist()):
    assert all(t == bench.settings.pad_id for t in row[length:])
  assert eos["ratio"] == pytest.approx(eos["ours"]["tps"] / eos["theirs"]["tps"])

  fixed = bench_generate.bench_grpo_variant(bench, eos=False, repeats=1)
  for side in ("ours", "theirs"):
    tokens_nw, lengths_n = fixed[side]["last"]
    assert tokens_nw.shape == (b * g, n) and (lengths_n == n).all(), side
    assert (tokens_nw == EOS).any(), side  # EOS was sampled and did not stop the row
    assert fixed[side]["tokens"] == b * g * n and fixed[side]["stopped"] == 0

  table = bench_generate.grpo_markdown([eos, fixed], bench, "tiny", 1)
  assert "| eos |" in table and "| fixed |" in table
