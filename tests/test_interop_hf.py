"""HF interop: tiny transformers Llama/Qwen2/Mistral models <-> this decoder, logits and bits."""

from __future__ import annotations

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from research.errors import CheckpointError, ConfigError
from research.interop.hf_config import hf_config_from_model_config, model_config_from_hf
from research.interop.hf_export import export_hf
from research.interop.hf_import import load_hf_checkpoint, read_safetensors_dir
from research.models.config import ModelConfig
from research.models.decoder import Decoder

transformers = pytest.importorskip("transformers")

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, initializer_range=0.05, bos_token_id=1, eos_token_id=2)
CASES = {
    "llama_gqa": ("llama", {}),
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_theta": ("llama", dict(rope_theta=500000.0)),
    "llama_odd_head_dim": ("llama", dict(hidden_size=48, head_dim=10)),
    "qwen2": ("qwen2", dict(use_sliding_window=False)),
    "mistral": ("mistral", dict(sliding_window=None, head_dim=12)),
}
_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def _randomize_(model: torch.nn.Module, seed: int) -> None:
  """Norm scales and biases start at 1 / 0 in transformers; random ones test their mapping too."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _hf_config(arch: str, **overrides):
  rope_theta = overrides.pop("rope_theta", None)
  cls = getattr(transformers, _CONFIG_CLASSES[arch])
  config = cls(**{**BASE, **overrides})
  if rope_theta is not None:
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
  return config


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Every case saved once as an HF safetensors checkpoint."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for seed, (case, (arch, overrides)) in enumerate(CASES.items()):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch, **overrides))
    _randomize_(model, seed)
    model.save_pretrained(root / case, safe_serialization=True)
    out[case] = root / case
  return out


def _padded_batch(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  b, t = 4, 12
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, :3] = 0  # left padded
  mask[2, -4:] = 0  # right padded
  mask[3, :2] = 0  # both
  mask[3, -3:] = 0
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(),
                attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(positions).long())
  return out.logits.float().numpy()


def _our_logits(cfg: ModelConfig, params, tokens, mask, positions) -> np.ndarray:
  logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                                 jnp.asarray(positions))
  return np.asarray(logits)


def _assert_close_at_real_tokens(ours, theirs, mask, atol=1e-4):
  real = mask.astype(bool)
  diff = np.abs(ours[real] - theirs[real]).max()
  assert diff < atol, f"max abs logit difference {diff}"


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_ours_logits_and_bit_exact_round_trip(case, hf_dirs, tmp_path):
  arch, _ = CASES[case]
  cfg, params = load_hf_checkpoint(hf_dirs[case])
  assert cfg.hf_architecture == arch
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case], dtype=torch.float32)
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  _assert_close_at_real_tokens(_our_logits(cfg, params, tokens, mask, positions),
                               _hf_logits(hf_model, tokens, mask, positions), mask)

  export_hf(params, cfg, tmp_path / "out")  # architecture comes from cfg.hf_architecture
  assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == arch
  src, out = read_safetensors_dir(hf_dirs[case]), read_safetensors_dir(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for name in src:
    assert src[name].dtype == out[name].dtype, name
    assert np.array_equal(src[name], out[name]), name
  assert model_config_from_hf(json.loads((tmp_path / "out" / "config.json").read_text()),
                              param_dtype=cfg.param_dtype) == cfg


def test_round_trip_sharded_output_is_bit_exact(hf_dirs, tmp_path):
  cfg, params = load_hf_checkpoint(hf_dirs["qwen2"])
  export_hf(params, cfg, tmp_path / "out", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0].startswith("model-00001-of-")
  assert not (tmp_path / "out" / "model.safetensors").exists()
  src, out = read_safetensors_dir(hf_dirs["qwen2"]), read_safetensors_dir(tmp_path / "out")
  assert sorted(src) == sorted(out) == sorted(index["weight_map"])
  assert all(np.array_equal(src[n], out[n]) for n in src)
  # ...and the sharded dir imports again, to the same params.
  cfg2, params2 = load_hf_checkpoint(tmp_path / "out")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def _random_params(cfg: ModelConfig, seed: int):
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
                         ["params"])
  # Norm scales init to 1 and biases to 0: make them random so their export is tested too.
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))

  def perturb(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("scale") or name.endswith("bias"):
      return x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype)
    return x * 3  # init stddev 0.02 gives near-uniform logits; larger weights test more
  return jax.tree_util.tree_map_with_path(perturb, params)


OUR_CASES = {
    "llama_gqa": ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, mlp_dim=48, rope_theta=500000.0, eos_token_id=2),
    "bias_tied_is_qwen2": ModelConfig(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=4,
                                   num_kv_heads=4, head_dim=10, mlp_dim=40, attention_bias=True,
                                   tie_embeddings=True),
    "qwen2_no_bias": ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=1, mlp_dim=48, hf_architecture="qwen2"),
    "mistral_unrolled": ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, mlp_dim=48, scan_layers=False,
                                    hf_architecture="mistral"),
}


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_ours_to_hf_logits(case, tmp_path):
  cfg = OUR_CASES[case]
  params = _random_params(cfg, seed=len(case))
  out = export_hf(params, cfg, tmp_path / "out")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  default = "qwen2" if cfg.attention_bias else "llama"
  assert hf_model.config.model_type == (cfg.hf_architecture or default)
  tokens, mask, positions = _padded_batch(cfg.vocab_size, seed=1)
  _assert_close_at_real_tokens(_our_logits(cfg, params, tokens, mask, positions),
                               _hf_logits(hf_model, tokens, mask, positions), mask)
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen.get("eos_token_id") == cfg.eos_token_id


def test_bfloat16_export_loads_as_bfloat16(tmp_path):
  cfg = OUR_CASES["llama_gqa"]
  params = _random_params(cfg, seed=3)
  out = export_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
  assert all(str(x.dtype) == "bfloat16" for x in read_safetensors_dir(out).values())
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert hf_model.dtype == torch.bfloat16
  assert hf_model.model.embed_tokens.weight.dtype == torch.bfloat16
  cfg2, params2 = load_hf_checkpoint(out, dtype="bfloat16")
  assert cfg2.param_dtype == "bfloat16"
  assert params2["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params2["embed"]["embedding"]),
                                np.asarray(params["embed"]["embedding"].astype(jnp.bfloat16)))


def _word_tokenizer(n_tokens: int):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n_tokens)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              bos_token="<s>", eos_token="</s>")


def test_tokenizer_is_exported_and_checked_against_vocab(hf_dirs, tmp_path):
  cfg, params = load_hf_checkpoint(hf_dirs["llama_gqa"])
  tok_dir = tmp_path / "tok"
  _word_tokenizer(VOCAB - 6).save_pretrained(tok_dir)
  out = export_hf(params, cfg, tmp_path / "with_tok", tokenizer=tok_dir)
  assert len(transformers.AutoTokenizer.from_pretrained(out)) == VOCAB - 6
  for name in ("tokenizer.json", "tokenizer_config.json"):  # copied verbatim
    assert (out / name).read_bytes() == (tok_dir / name).read_bytes()
  out = export_hf(params, cfg, tmp_path / "tok_obj", tokenizer=_word_tokenizer(VOCAB - 6))
  assert len(transformers.AutoTokenizer.from_pretrained(out)) == VOCAB - 6
  load_hf_checkpoint(out)  # a smaller tokenizer is fine (padded vocab)

  big = tmp_path / "big_tok"
  shutil.copytree(hf_dirs["llama_gqa"], big)
  _word_tokenizer(VOCAB + 5).save_pretrained(big)
  with pytest.raises(CheckpointError, match=f"{VOCAB + 5} tokens.*vocab_size={VOCAB}"):
    load_hf_checkpoint(big)
  with pytest.raises(CheckpointError, match="tokenizer has"):
    export_hf(params, cfg, tmp_path / "x", tokenizer=_word_tokenizer(VOCAB + 1))
  assert not (tmp_path / "x").exists()


def _rewrite_weights(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  shutil.copytree(src, dst)
  tensors = read_safetensors_dir(dst)
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


def test_checkpoint_errors_name_the_tensor(hf_dirs, tmp_path):
  src = hf_dirs["llama_gqa"]
  name = "model.layers.1.mlp.up_proj.weight"
  missing = _rewrite_weights(src, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=f"'{name}' is missing"):
    load_hf_checkpoint(missing)

  def reshape(t):
    t[name] = np.zeros((47, 32), np.float32)
  bad_shape = _rewrite_weights(src, tmp_path / "shape", reshape)
  with pytest.raises(CheckpointError, match=rf"'{name}'.*shape \[47, 32\], expected \[48, 32\]"):
    load_hf_checkpoint(bad_shape)

  def add_extra(t):
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((4,), np.float32)  # ignored
    t["model.layers.0.mystery.weight"] = np.zeros((2,), np.float32)
  extra = _rewrite_weights(src, tmp_path / "extra", add_extra)
  with pytest.raises(CheckpointError, match=r"unexpected tensors.*mystery") as e:
    load_hf_checkpoint(extra)
  assert "inv_freq" not in str(e.value)

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  shutil.copy(src / "config.json", pickled)
  (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*only safetensors"):
    load_hf_checkpoint(pickled)


def test_config_errors(hf_dirs, tmp_path):
  base = json.loads((hf_dirs["llama_gqa"] / "config.json").read_text())
  gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4).to_dict()
  with pytest.raises(ConfigError, match=r"unsupported architecture.*'gpt2'.*llama.*qwen2.*mistral"):
    model_config_from_hf(gpt2)
  gpt2_dir = _rewrite_weights(hf_dirs["llama_gqa"], tmp_path / "gpt2", lambda t: None)
  (gpt2_dir / "config.json").write_text(json.dumps(gpt2))
  with pytest.raises(ConfigError, match="gpt2"):
    load_hf_checkpoint(gpt2_dir)
  for key in ("rope_parameters", "rope_scaling"):  # scaled RoPE: tests/test_rope_scaling.py
    longrope = {**base, key: {"rope_type": "longrope", "short_factor": [1.0] * 4,
                              "long_factor": [2.0] * 4, "original_max_position_embeddings": 16,
                              "rope_theta": 10000.0}}
    with pytest.raises(ConfigError, match=f"{key}.rope_type='longrope'"):
      model_config_from_hf(longrope)
  legacy = {**base, "rope_theta": 1234.0, "rope_scaling": None}
  del legacy["rope_parameters"]
  assert model_config_from_hf(legacy).rope_theta == 1234.0
  # Sliding windows are read as transformers applies them (tests/test_interop_sliding.py runs them).
  windowed = json.loads((hf_dirs["mistral"] / "config.json").read_text())
  windowed["sliding_window"] = 16
  assert model_config_from_hf(windowed).sliding_layers() == (True, True)
  del windowed["sliding_window"]  # MistralConfig's default window
  assert model_config_from_hf(windowed).sliding_window == 4096
  qwen = json.loads((hf_dirs["qwen2"] / "config.json").read_text())
  off = model_config_from_hf({**qwen, "sliding_window": 16, "use_sliding_window": False})
  assert off.sliding_window is None and off.layer_types is None
  on = model_config_from_hf({**qwen, "sliding_window": 16, "use_sliding_window": True,
                             "max_window_layers": 1, "layer_types": None})
  assert on.sliding_window == 16 and on.sliding_layers() == (False, True)
  with pytest.raises(ConfigError, match="mlp_bias"):
    model_config_from_hf({**base, "mlp_bias": True})
  with pytest.raises(ConfigError, match="attention_bias=true.*o_proj"):
    model_config_from_hf({**base, "attention_bias": True})
  for arch in ("llama", "mistral"):
    with pytest.raises(ConfigError, match=f"attention_bias=true cannot be exported as {arch}"):
      hf_config_from_model_config(OUR_CASES["bias_tied_is_qwen2"], architecture=arch)


def test_existing_out_dir_needs_overwrite(hf_dirs, tmp_path):
  cfg, params = load_hf_checkpoint(hf_dirs["llama_tied"])
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(CheckpointError, match=f"{out} already exists.*overwrite"):
    export_hf(params, cfg, out)
  assert (out / "old.txt").exists()
  export_hf(params, cfg, out, overwrite=True)
  assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left behind


def _sharding_for(mesh: Mesh, path, x) -> NamedSharding:
  """fsdp on the first divisible non-layer axis, tensor on the next one divisible by 4."""
  spec: list = [None] * x.ndim
  start = 1 if path[0].key == "layers" else 0
  for axis in range(start, x.ndim):
    if "fsdp" not in spec and x.shape[axis] % mesh.shape["fsdp"] == 0:
      spec[axis] = "fsdp"
    elif "fsdp" in spec and x.shape[axis] % mesh.shape["tensor"] == 0:
      spec[axis] = "tensor"
      break
  return NamedSharding(mesh, P(*spec))


def test_import_with_shardings_places_each_leaf(hf_dirs):
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
  cfg, ref = load_hf_checkpoint(hf_dirs["qwen2"])
  shardings = jax.tree_util.tree_map_with_path(lambda p, x: _sharding_for(mesh, p, x), ref)
  assert shardings["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  _, params = load_hf_checkpoint(hf_dirs["qwen2"], shardings=shardings)

  def check(x, s, r):
    assert x.sharding == s
    np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
  jax.tree.map(check, params, shardings, ref)
  with pytest.raises(ConfigError, match="embed/embedding"):
    load_hf_checkpoint(hf_dirs["qwen2"], shardings={"layers": shardings["layers"]})


def test_convert_script_round_trip(hf_dirs, tmp_path, capsys):
  convert = pytest.importorskip("scripts.convert")
  src = tmp_path / "src"
  shutil.copytree(hf_dirs["qwen2"], src)
  _word_tokenizer(VOCAB - 6).save_pretrained(src)
  workdir, out = tmp_path / "run", tmp_path / "out"
  assert convert.main(["from-hf", str(src), str(workdir)]) == 0
  assert convert.main(["to-hf", str(workdir), str(out), "--max-shard-bytes", "30000"]) == 0
  assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
  a, b = read_safetensors_dir(src), read_safetensors_dir(out)
  assert sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)
  # What AutoTokenizer makes of the files depends on config.json's model_type too: compare that.
  assert (len(transformers.AutoTokenizer.from_pretrained(out)) ==
          len(transformers.AutoTokenizer.from_pretrained(src)))
  assert convert.main(["to-hf", str(workdir), str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
