"""Tiny GGUF files written here as llama.cpp's converter writes them (q/k rows interleaved for
Llama, F32 norms, a byte-level BPE tokenizer with a ChatML template), for the GGUF tests."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a")


def _byte_symbols() -> list[str]:
  """GPT-2's byte -> printable character table, in byte order."""
  keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  table, n = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + n)
      n += 1
  return [table[b] for b in range(256)]


def tokenizer_tokens() -> list[str]:
  merged = ["".join(m.split(" ")) for m in MERGES]
  return list(SPECIALS) + _byte_symbols() + merged


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py LlamaModel.permute: HF rotary halves -> interleaved pairs."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _hf_state(arch: str, cfg: dict, tie: bool, seed: int) -> dict[str, np.ndarray]:
  """Random HF-named float32 tensors of a tiny model ([out, in] Linear weights)."""
  rng = np.random.default_rng(seed)
  e, f, v, d = cfg["hidden"], cfg["mlp"], cfg["vocab"], cfg["head_dim"]
  h, k = cfg["heads"], cfg["kv_heads"]
  w = lambda *shape: (0.08 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
  out = {"model.embed_tokens.weight": w(v, e), "model.norm.weight": 1 + w(e)}
  if not tie:
    out["lm_head.weight"] = w(v, e)
  for i in range(cfg["layers"]):
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": w(h * d, e), p + "self_attn.k_proj.weight": w(k * d, e),
                p + "self_attn.v_proj.weight": w(k * d, e), p + "self_attn.o_proj.weight": w(e, h * d),
                p + "mlp.gate_proj.weight": w(f, e), p + "mlp.up_proj.weight": w(f, e),
                p + "mlp.down_proj.weight": w(e, f), p + "input_layernorm.weight": 1 + w(e),
                p + "post_attention_layernorm.weight": 1 + w(e)})
    if arch == "qwen2":
      out.update({p + "self_attn.q_proj.bias": w(h * d), p + "self_attn.k_proj.bias": w(k * d),
                  p + "self_attn.v_proj.bias": w(k * d)})
    if arch == "qwen3":
      out.update({p + "self_attn.q_norm.weight": 1 + w(d), p + "self_attn.k_norm.weight": 1 + w(d)})
  return out


_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def _gguf_name(hf_name: str) -> str:
  base, suffix = hf_name.rsplit(".", 1)
  if base.startswith("model.layers."):
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest]}.{suffix}"
  return f"{_GGUF_NAMES[base]}.{suffix}"


def write_gguf(path: pathlib.Path, *, arch: str = "llama", quant: str = "F32", tie: bool = False,
               name: str = "tiny", seed: int = 0, layers: int = 2, hidden: int = 64,
               rope_theta: float = 10000.0, extra_tensors: dict | None = None,
               extra_fields: dict | None = None, head_dim: int | None = None) -> pathlib.Path:
  """A GGUF file of a random tiny `arch` model; matrices in `quant` (F32, F16, Q8_0, or Q8_1
  as zero bytes, which nothing here dequantises). `head_dim` other than hidden / heads is written
  as attention.key_length (as llama.cpp's converter does); qwen3 files carry q/k norms."""
  tokens = tokenizer_tokens()
  cfg = dict(hidden=hidden, mlp=128, vocab=len(tokens), heads=4, kv_heads=2, layers=layers,
             head_dim=head_dim or hidden // 4)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name(name)
  writer.add_context_length(256)
  writer.add_embedding_length(cfg["hidden"])
  writer.add_block_count(cfg["layers"])
  writer.add_feed_forward_length(cfg["mlp"])
  writer.add_head_count(cfg["heads"])
  writer.add_head_count_kv(cfg["kv_heads"])
  writer.add_rope_freq_base(rope_theta)
  writer.add_layer_norm_rms_eps(1e-5)
  if arch == "llama":
    writer.add_rope_dimension_count(cfg["hidden"] // cfg["heads"])
  if head_dim is not None:
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}.get(quant, 0))
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
  writer.add_token_merges(list(MERGES))
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(False)
  writer.add_chat_template(CHAT_TEMPLATE)
  for key, value in (extra_fields or {}).items():
    getattr(writer, key)(value)
  for hf_name, x in _hf_state(arch, cfg, tie, seed).items():
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      x = _llama_cpp_permute(x, cfg["heads"] if "q_proj" in hf_name else cfg["kv_heads"])
    if x.ndim == 1 or quant == "F32":
      writer.add_tensor(_gguf_name(hf_name), x)
    elif quant == "F16":
      writer.add_tensor(_gguf_name(hf_name), x.astype(np.float16))
    elif quant == "Q8_1":  # a type the gguf package cannot (de)quantise: zero bytes, for errors
      qtype = gguf.GGMLQuantizationType.Q8_1
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      zeros = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
      writer.add_tensor(_gguf_name(hf_name), zeros, raw_dtype=qtype)
    else:
      qtype = gguf.GGMLQuantizationType[quant]
      writer.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  for gguf_name, x in (extra_tensors or {}).items():
    writer.add_tensor(gguf_name, x)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


_GEMMA_GGUF_NAMES = {**_GGUF_NAMES, "post_attention_layernorm": "post_attention_norm",
                     "pre_feedforward_layernorm": "ffn_norm",
                     "post_feedforward_layernorm": "post_ffw_norm",
                     "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def write_gemma_gguf(path: pathlib.Path, arch: str, config: dict,
                     state: dict[str, np.ndarray]) -> pathlib.Path:
  """A GGUF file of a Gemma 2 / Gemma 3 model as llama.cpp's converter writes it: HF tensors
  `state` (float32, [out, in]) under llama.cpp's names, every norm weight stored as 1 + w (the
  scale llama.cpp multiplies by), no output.weight when tied; `config` its HF config dict."""
  tokens = tokenizer_tokens()
  assert config["vocab_size"] == len(tokens)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name(f"tiny {arch}")
  writer.add_context_length(config["max_position_embeddings"])
  writer.add_embedding_length(config["hidden_size"])
  writer.add_block_count(config["num_hidden_layers"])
  writer.add_feed_forward_length(config["intermediate_size"])
  writer.add_head_count(config["num_attention_heads"])
  writer.add_head_count_kv(config["num_key_value_heads"])
  writer.add_key_length(config["head_dim"])
  writer.add_value_length(config["head_dim"])
  writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
  writer.add_sliding_window(config["sliding_window"])
  if arch == "gemma2":
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
  else:
    writer.add_rope_freq_base(config["rope_theta"])
  writer.add_file_type(0)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
  writer.add_token_merges(list(MERGES))
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_pad_token_id(0)
  for hf_name, x in state.items():
    base, suffix = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
      _, _, i, rest = base.split(".", 3)
      name = f"blk.{i}.{_GEMMA_GGUF_NAMES[rest]}.{suffix}"
    else:
      name = f"{_GEMMA_GGUF_NAMES[base]}.{suffix}"
    if "norm" in base:
      x = x + 1
    writer.add_tensor(name, np.ascontiguousarray(x, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
