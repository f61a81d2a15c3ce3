"""The sharded train step: the same loss and params on every mesh shape; accumulation is exact."""

import re

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from research.models.config import ModelConfig
from research.models.peft import NO_PEFT, PeftConfig
from research.parallel.mesh import make_mesh
from research.parallel.rules import batch_sharding
from research.stages.lm import decoder_init, lm_loss_fn
from research.train.optimizer import make_optimizer
from research.train.state import abstract_state, init_state
from research.train.step import jit_train_step, make_train_step

# One layer stream (on CPU 0 would pick 2), the reference the stream tests compare with.
CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, layer_streams=1)
OPT = ConfigDict(dict(lr=3e-3, warmup_steps=1, schedule="cosine", min_lr_ratio=0.1, b1=0.9,
                      b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))


def _batch(rng, rows=8, t=16):
  tokens = rng.integers(0, CFG.vocab_size, size=(rows, t + 1)).astype(np.int32)
  seg = np.ones((rows, t), np.int32)
  seg[1, 10:] = 2  # a packed row
  seg[2, 12:] = 0  # a padded row
  pos = np.where(seg[1:2] == 2, np.arange(t) - 10, np.arange(t))
  positions = np.broadcast_to(np.arange(t), (rows, t)).copy()
  positions[1] = pos[0]
  mask = (seg != 0).astype(np.float32)
  mask[:, -1] = 0
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg, positions=positions,
              loss_mask=mask)


def _run(mesh_sizes, steps=3, micro_batches=1, devices=None, peft=NO_PEFT, cfg=CFG):
  mesh = make_mesh(mesh_sizes, devices)
  tx, schedule = make_optimizer(OPT, total_steps=10)
  init_fn = decoder_init(cfg, peft)
  _, shardings = abstract_state(init_fn, tx, mesh)
  state = init_state(init_fn, tx, shardings, seed=0)
  bs = batch_sharding(mesh)
  step = jit_train_step(make_train_step(lm_loss_fn(cfg, peft), tx, schedule, micro_batches),
                        shardings, bs)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    batch = {k: jax.device_put(v, bs) for k, v in _batch(rng).items()}
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))  # blocks: one step in flight
  return losses, jax.device_get(state.params), state


def _assert_trains_alike(losses, params, ref_losses, ref_params):
  """The same losses and trained params, to 1e-5 relative in float32."""
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params,
               ref_params)


@pytest.fixture(scope="module")
def single_device_run():
  return _run({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize("sizes", [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_shapes_match_single_device(single_device_run, sizes):
  ref_losses, ref_params, _ = single_device_run
  n = int(np.prod(sizes))
  losses, params, state = _run(dict(zip(("data", "fsdp", "tensor"), sizes)),
                               devices=jax.devices()[:n])
  _assert_trains_alike(losses, params, ref_losses, ref_params)
  assert ref_losses[-1] < ref_losses[0]
  if sizes == (2, 2, 2):  # params really are sharded, not replicated
    q_spec = state.params["layers"]["attn"]["q"]["kernel"].sharding.spec
    assert q_spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


@pytest.mark.parametrize("sizes", [(1, 1, 1), (2, 2, 2)])
def test_layer_streams_train_as_one_stream_on_every_mesh(single_device_run, sizes):
  """Two row streams per layer (on (2,2,2) each device's 2 rows split into 1 + 1) train exactly
  as one stream on one device."""
  ref_losses, ref_params, _ = single_device_run
  n = int(np.prod(sizes))
  losses, params, _ = _run(dict(zip(("data", "fsdp", "tensor"), sizes)), devices=jax.devices()[:n],
                           cfg=CFG.replace(layer_streams=2))
  _assert_trains_alike(losses, params, ref_losses, ref_params)


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
  ref_losses, ref_params, _ = single_device_run
  losses, params, _ = _run({"data": 1, "fsdp": 1, "tensor": 1}, micro_batches=4,
                           devices=jax.devices()[:1])
  _assert_trains_alike(losses, params, ref_losses, ref_params)


@pytest.mark.parametrize("sizes,tied", [((1, 1, 1), False), ((2, 2, 2), False), ((1, 8, 1), False),
                                        ((2, 2, 2), True)])
def test_chunked_lm_loss_matches_whole_logits_on_every_mesh(sizes, tied):
  """The LM head run in chunks of 4 tokens per device (several chunks, one partial kernel
  gradient per batch shard; the embedding table's transpose when tied) trains exactly as whole
  logits on one device."""
  cfg = CFG.replace(tie_embeddings=tied)
  ref_losses, ref_params, _ = _run({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1],
                                   cfg=cfg.replace(loss_chunk_tokens=0))
  n = int(np.prod(sizes))
  losses, params, _ = _run(dict(zip(("data", "fsdp", "tensor"), sizes)), devices=jax.devices()[:n],
                           cfg=cfg.replace(loss_chunk_tokens=4))
  _assert_trains_alike(losses, params, ref_losses, ref_params)


@pytest.mark.parametrize("peft", [
    PeftConfig("lora", r=4, targets=("q", "v", "o", "gate", "up", "down")),
    PeftConfig("prompt", num_virtual_tokens=3),
    PeftConfig("adapter", adapter_dim=8)], ids=lambda p: p.method)
def test_peft_on_a_sharded_mesh_matches_single_device(peft):
  """PEFT modules (LoRA deltas, the prepended soft prompt, adapters) under the activation
  constraints on a (2, 2, 2) mesh, with 2 layer streams: the same losses and trained params as one
  stream on one device."""
  ref_losses, ref_params, _ = _run({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1],
                                   peft=peft)
  losses, params, _ = _run({"data": 2, "fsdp": 2, "tensor": 2}, peft=peft,
                           cfg=CFG.replace(layer_streams=2))
  _assert_trains_alike(losses, params, ref_losses, ref_params)


def _abstract_batch(sharding, rows: int, t: int) -> dict:
  return {k: jax.ShapeDtypeStruct((rows, t), np.float32 if k == "loss_mask" else np.int32,
                                  sharding=sharding)
          for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}


def test_fsdp_activations_are_sharded_over_the_batch():
  """Under FSDP the decoder's activation constraints keep each device's share of the batch: the
  compiled step's per-device temporaries are well under those of the same step jitted without
  them, where XLA gathers the weights' sharding into the activations and holds the whole batch."""
  cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=128)
  mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  tx, schedule = make_optimizer(OPT, total_steps=10)
  abstract, shardings = abstract_state(decoder_init(cfg), tx, mesh)
  bs = batch_sharding(mesh)
  batch = _abstract_batch(bs, 16, 64)
  step_fn = make_train_step(lm_loss_fn(cfg), tx, schedule)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  unconstrained = jax.jit(step_fn, in_shardings=(shardings, bs),
                          out_shardings=(shardings, replicated), donate_argnums=(0,))

  def temp_bytes(step):
    return step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes

  ours, theirs = temp_bytes(jit_train_step(step_fn, shardings, bs)), temp_bytes(unconstrained)
  assert ours < 0.5 * theirs, (ours, theirs)


def test_chunked_lm_loss_never_holds_the_whole_logits():
  """With a large vocabulary the step's temporaries shrink by more than one whole [B, T, V]
  float32 logits buffer when the LM head runs in chunks (whole: the logits and their gradient)."""
  cfg = ModelConfig(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=64)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, schedule = make_optimizer(OPT, total_steps=10)
  b, t = 8, 64
  bs = batch_sharding(mesh)
  batch = _abstract_batch(bs, b, t)

  def temp_bytes(chunk_tokens):
    c = cfg.replace(loss_chunk_tokens=chunk_tokens)
    abstract, shardings = abstract_state(decoder_init(c), tx, mesh)
    step = jit_train_step(make_train_step(lm_loss_fn(c), tx, schedule), shardings, bs)
    return step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = b * t * cfg.vocab_size * 4
  chunked, whole = temp_bytes(64), temp_bytes(0)
  assert chunked < whole - logits_bytes, (chunked, whole, logits_bytes)


def test_chunked_lm_loss_loop_has_no_collectives_under_fsdp():
  """Each device sums its own shard's kernel gradient and loss inside the chunk loop: the loop
  body (the computation holding the [rows, vocab] logits product) has no cross-device collective;
  the partial sums meet once, after it."""
  cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=128, loss_chunk_tokens=16)
  mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  tx, schedule = make_optimizer(OPT, total_steps=10)
  abstract, shardings = abstract_state(decoder_init(cfg), tx, mesh)
  bs = batch_sharding(mesh)
  batch = _abstract_batch(bs, 16, 64)
  hlo = jit_train_step(make_train_step(lm_loss_fn(cfg), tx, schedule), shardings,
                       bs).lower(abstract, batch).compile().as_text()
  computations = re.findall(r"\n%?[\w.\-]+ \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S)
  loops = [c for c in computations if " while(" not in c and re.search(
      r"= f32\[16,1000\]\S* fusion\(", c)]  # 16 tokens per device per chunk
  assert loops, "no chunk loop found"
  for body in loops:
    assert not re.search(r"all-reduce|reduce-scatter|all-gather|all-to-all", body), body
  assert re.search(r"all-reduce|reduce-scatter", hlo)  # the partial sums do meet, outside it
