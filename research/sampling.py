"""Batched decoding with a preallocated KV cache in one compiled loop (no host round trip per token).

Greedy, temperature, top-k and top-p sampling, an optional repetition penalty; a set of stop
tokens, each row stopping on its own; left-padded prompts of different lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.models.config import ModelConfig
from research.models.decoder import Decoder, default_positions, init_cache, unstack_layers
from research.models.peft import NO_PEFT, PeftConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  stop_tokens: tuple[int, ...] = ()
  # transformers' `repetition_penalty` (CTRL): the logit of every token already in the row (prompt
  # or generated; padding excluded) is divided by it where positive, multiplied where negative,
  # before temperature and filtering. 1 = off. For generation only: the RL stages sample from the
  # policy's own distribution, whose log-probs they train on.
  repetition_penalty: float = 1.0
  # Print "decoded i/N tokens" to stderr every this many tokens (0: never). One host callback per
  # print, none in between: for long generations that would otherwise be silent until they end.
  progress_every: int = 0


def _report_progress(i, n: int) -> None:
  import sys  # pylint: disable=import-outside-toplevel
  print(f"decoded {int(i)}/{n} tokens", file=sys.stderr, flush=True)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P], segment_ids [B, P]) with prompts right-aligned; segment 0 marks padding."""
  width = max(1, max(len(p) for p in prompts))
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  segments = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, width - len(p):] = p
      segments[i, width - len(p):] = 1
  return tokens, segments


def kv_cache_bytes(cfg: ModelConfig, rows: int, slots: int) -> int:
  """Bytes of the k and v buffers `generate_tokens` allocates for `rows` rows of `slots` slots."""
  per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim
  return rows * slots * per_slot * jnp.dtype(cfg.compute_dtype).itemsize


def free_memory_bytes() -> int | None:
  """What the default device can still hold (host RAM available on CPU); None when unknown."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    import os  # pylint: disable=import-outside-toplevel
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def decode_length_error(cfg: ModelConfig, rows: int, prompt_tokens: int, padded_prompt: int,
                        max_new_tokens: int, free_bytes: int | None) -> str | None:
  """Why decoding `max_new_tokens` after a prompt of `prompt_tokens` tokens cannot run, or None:
  positions past `cfg.max_position_embeddings` (the model never saw them), or a KV cache larger
  than `free_bytes`. Dynamic NTK rope has no such limit: it rescales its base to each call's
  longest position, so max_position_embeddings is where stretching starts, not a bound."""
  limit = cfg.max_position_embeddings
  dynamic = cfg.rope_scaling is not None and dict(cfg.rope_scaling)["rope_type"] == "dynamic"
  if prompt_tokens + max_new_tokens > limit and not dynamic:
    room = max(limit - prompt_tokens, 0)
    return (f"--max_new_tokens={max_new_tokens} after a prompt of {prompt_tokens} tokens needs "
            f"{prompt_tokens + max_new_tokens} positions, but the model has "
            f"max_position_embeddings={limit}: ask for at most {room} new tokens")
  need = kv_cache_bytes(cfg, rows, padded_prompt + max_new_tokens)
  if free_bytes is not None and need > 0.8 * free_bytes:
    return (f"the KV cache for {rows} rows of {padded_prompt + max_new_tokens} tokens needs "
            f"{need / 2**30:.1f} GiB, and {free_bytes / 2**30:.1f} GiB are free: lower "
            "--max_new_tokens or --batch_size")
  return None


def filter_logits(logits_bv: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus) masking; masked entries become -inf."""
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  if top_k:
    kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
  if top_p < 1.0:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # Keep a token while the mass before it is below top_p (so the top token always stays).
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    cutoff_b1 = jnp.min(jnp.where(before_bv < top_p, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
  return logits_bv


def penalize_repeats(logits_bv: jax.Array, seen_bv: jax.Array, penalty: float) -> jax.Array:
  """transformers' RepetitionPenaltyLogitsProcessor: `seen_bv` marks each row's tokens so far."""
  logits_bv = logits_bv.astype(jnp.float32)
  hit_bv = jnp.where(logits_bv > 0, logits_bv / penalty, logits_bv * penalty)
  return jnp.where(seen_bv, hit_bv, logits_bv)


def _choose(logits_bv, rng, s: SamplingConfig):
  if s.temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_bv, s.temperature, s.top_k, s.top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def _per_layer(cache: dict, num_layers: int) -> dict:
  """The cache with k and v as tuples of per-layer [B, S, K, D] buffers.

  The unrolled decoder indexes them per layer and stacks what it returns; splitting that stack
  again folds away in XLA (slice of concatenate), so each layer's buffer is updated in place.
  """
  return {**cache, "k": tuple(cache["k"][i] for i in range(num_layers)),
          "v": tuple(cache["v"][i] for i in range(num_layers))}


def generate_tokens(params: Any, tokens_bp: jax.Array, segments_bp: jax.Array, rng: jax.Array, *,
                    cfg: ModelConfig, sampling: SamplingConfig, pad_id: int,
                    peft: PeftConfig = NO_PEFT) -> tuple[jax.Array, jax.Array]:
  """(new tokens [B, N], lengths [B]): after a row's stop token it emits `pad_id`.

  The length counts tokens up to and including the first stop token. Compiled on its own, or as
  part of the jit it is traced in (e.g. a PPO iteration), with that jit's compiler options.
  """
  traced = any(isinstance(x, jax.core.Tracer)
               for x in jax.tree.leaves((params, tokens_bp, segments_bp, rng)))
  # jax accepts compiler options on a top-level jit only.
  top_level_cpu = not traced and jax.default_backend() == "cpu"
  jitted = _generate_tokens_cpu if top_level_cpu else _generate_tokens_jit
  return jitted(params, tokens_bp, segments_bp, rng, cfg=cfg, sampling=sampling, pad_id=pad_id,
                peft=peft)


def _generate_tokens(params: Any, tokens_bp: jax.Array, segments_bp: jax.Array, rng: jax.Array, *,
                     cfg: ModelConfig, sampling: SamplingConfig, pad_id: int,
                     peft: PeftConfig) -> tuple[jax.Array, jax.Array]:
  # Decoding runs the layers unrolled, each with its own KV buffer: over stacked layers or a
  # stacked cache, every step would copy each layer's cache (and weights) out and back.
  if cfg.scan_layers:
    params = unstack_layers(params, cfg.num_layers)
  # remat only matters for gradients; unrolled it would also add barriers to the forward.
  cfg = cfg.replace(scan_layers=False, remat_policy="none")
  model = Decoder(cfg, peft)
  b, p = tokens_bp.shape
  n = sampling.max_new_tokens
  virtual = peft.num_virtual_tokens if peft.method == "prompt" else 0
  cache = _per_layer(init_cache(cfg, b, virtual + p + n), cfg.num_layers)
  positions_bp = default_positions(segments_bp)
  logits_btv, _, cache = model.apply({"params": params}, tokens_bp, segments_bp, positions_bp,
                                     cache=cache, prefill=True)
  stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

  penalty = sampling.repetition_penalty
  rows_b = jnp.arange(b)

  def emit(state, logits_bv, rng):
    out_bn, done_b, length_b, i, seen_bv = state
    if penalty != 1.0:
      logits_bv = penalize_repeats(logits_bv, seen_bv, penalty)
    tok_b = _choose(logits_bv, rng, sampling)
    tok_b = jnp.where(done_b, pad_id, tok_b)
    out_bn = jax.lax.dynamic_update_slice(out_bn, tok_b[:, None], (0, i))
    length_b = length_b + (~done_b).astype(jnp.int32)
    if penalty != 1.0:
      seen_bv = seen_bv.at[rows_b, tok_b].set(True)
    done_b = done_b | jnp.isin(tok_b, stops)
    return (out_bn, done_b, length_b, i + 1, seen_bv), tok_b

  # The tokens each row holds, for the repetition penalty (an empty leaf when it is off).
  seen_bv = (jnp.zeros((b, logits_btv.shape[-1]), bool).at[rows_b[:, None], tokens_bp]
             .max(segments_bp > 0) if penalty != 1.0 else jnp.zeros((b, 0), bool))
  state = (jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
           jnp.int32(0), seen_bv)
  state, tok_b = emit(state, logits_btv[:, -1], jax.random.fold_in(rng, 0))
  pos_b = positions_bp[:, -1] + 1  # the model shifts real positions past virtual tokens itself

  def cond(carry):
    (_, done_b, _, i, _), _, _, _ = carry
    return (i < n) & ~jnp.all(done_b)

  def body(carry):
    state, tok_b, pos_b, cache = carry
    logits_b1v, _, cache = model.apply(
        {"params": params}, tok_b[:, None], jnp.ones((b, 1), jnp.int32),
        (pos_b + virtual)[:, None], cache=cache, prefill=False)
    state, tok_b = emit(state, logits_b1v[:, 0], jax.random.fold_in(rng, state[3]))
    if sampling.progress_every:
      i = state[3]
      jax.lax.cond(i % sampling.progress_every == 0,
                   lambda: jax.debug.callback(_report_progress, i, n), lambda: None)
    return state, tok_b, pos_b + 1, _per_layer(cache, cfg.num_layers)

  state, _, _, _ = jax.lax.while_loop(
      cond, body, (state, tok_b, pos_b, _per_layer(cache, cfg.num_layers)))
  return state[0], state[2]


_STATIC = ("cfg", "peft", "sampling", "pad_id")
_generate_tokens_jit = jax.jit(_generate_tokens, static_argnames=_STATIC)
# XLA:CPU's YNNPACK fusions run decoding's skinny matmuls (a few rows, the batch, times each
# weight) slower than its plain dot thunks, and the prefill gains nothing from them. Only this
# function's compile is affected; the option is XLA:CPU's, so other backends never get it.
_generate_tokens_cpu = jax.jit(_generate_tokens, static_argnames=_STATIC,
                               compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig, pad_id: int, rng: jax.Array | None = None,
             peft: PeftConfig = NO_PEFT) -> list[list[int]]:
  """Continuations of `prompts` (lists of ids), each cut after its first stop token."""
  tokens_bp, segments_bp = left_pad(prompts, pad_id)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  out_bn, lengths_b = generate_tokens(params, jnp.asarray(tokens_bp), jnp.asarray(segments_bp),
                                      rng, cfg=cfg, sampling=sampling, pad_id=pad_id, peft=peft)
  out_bn, lengths_b = np.asarray(out_bn), np.asarray(lengths_b)
  return [row[:n].tolist() for row, n in zip(out_bn, lengths_b)]


def greedy_generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, pad_id: int, eos_id: int | None = None,
                    peft: PeftConfig = NO_PEFT) -> list[list[int]]:
  """Greedy continuations; each row stops at its own EOS (kept in the output)."""
  sampling = SamplingConfig(max_new_tokens=max_new_tokens,
                            stop_tokens=() if eos_id is None else (eos_id,))
  return generate(params, cfg, prompts, sampling, pad_id, peft=peft)
