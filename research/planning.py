"""Ahead-of-time plans of a train step: per-device memory, FLOPs and a roofline step time on named
accelerators, from the step compiled on abstract shapes (jax.eval_shape: no weight is allocated)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import ConfigDict

from research.errors import ConfigError
from research.models.config import ModelConfig
from research.models.peft import NO_PEFT, PeftConfig
from research.parallel.mesh import make_mesh
from research.parallel.rules import Rules, batch_shard_count, logical_to_spec
from research.stages import setup
from research.stages.lm import decoder_init, lm_loss_fn
from research.train.builder import build_step
from research.train.state import TrainState

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  platform: str  # what jax.export lowers for: "cuda" or "tpu"
  bf16_flops: float  # dense peak, FLOP/s
  f32_flops: float  # dense peak of float32 dots at JAX's default precision (TF32 on GPU, one
  # bfloat16 pass on TPU)
  hbm_bandwidth: float  # bytes/s
  memory_bytes: float  # HBM per device

  def peak_flops(self, dtype: str) -> float:
    """The dense peak for dots computed in `dtype`."""
    return self.bf16_flops if jnp.dtype(dtype).itemsize <= 2 else self.f32_flops

  @property
  def usable_bytes(self) -> float:
    """What a JAX process can hold: on GPU the preallocated fraction of HBM (75% unless
    XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), on TPU all of it."""
    if self.platform != "cuda":
      return self.memory_bytes
    return self.memory_bytes * gpu_memory_fraction()


def gpu_memory_fraction() -> float:
  """JAX's GPU preallocation fraction: XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75."""
  raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
  try:
    fraction = float(raw) if raw else 0.75
  except ValueError as e:
    raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a number") from e
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} must lie in (0, 1]")
  return fraction


# Datasheet numbers per JAX device (a GPU, or a TPU chip: a v5p chip's two TensorCores are one
# device, so a v5p-128 slice is 64 devices; a v5e-64 is 64). Dense, no sparsity.
ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("NVIDIA H100 SXM", "cuda", 989e12, 494e12, 3.35e12, 80 * GIB),
    "h200": Accelerator("NVIDIA H200 SXM", "cuda", 989e12, 494e12, 4.8e12, 141 * GIB),
    "a100": Accelerator("NVIDIA A100 SXM 80GB", "cuda", 312e12, 156e12, 2.039e12, 80 * GIB),
    "v5e": Accelerator("TPU v5e", "tpu", 197e12, 197e12, 819e9, 16 * GIB),
    "v5p": Accelerator("TPU v5p", "tpu", 459e12, 459e12, 2.765e12, 95 * GIB),
}


def get_accelerator(name: str) -> Accelerator:
  key = name.lower().replace("tpu", "").replace("-", "").replace("_", "").strip()
  if key not in ACCELERATORS:
    raise ConfigError(f"unknown accelerator {name!r}; choose one of {sorted(ACCELERATORS)}")
  return ACCELERATORS[key]


def model_and_peft(config: ConfigDict) -> tuple[ModelConfig, PeftConfig]:
  if "model" not in config or not config.model.get("vocab_size"):
    raise ConfigError("planning needs a `model` section with model.vocab_size set (the stage would "
                      "take it from a tokenizer or an init directory)")
  cfg = setup.model_config_from(config.model)
  peft = NO_PEFT
  if "peft" in config:
    fields = config.peft.to_dict()
    fields["targets"] = tuple(fields.get("targets", ()))
    peft = PeftConfig(**fields)
  return cfg, peft


def seq_len_of(config: ConfigDict) -> int:
  return int(config.data.seq_len)


def abstract_batch(global_batch: int, seq_len: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The LM batch the stages feed (see research.data.loader), as shapes only."""
  dtypes = dict(inputs=jnp.int32, targets=jnp.int32, segment_ids=jnp.int32, positions=jnp.int32,
                loss_mask=jnp.float32)
  return {k: jax.ShapeDtypeStruct((global_batch, seq_len), d, sharding=sharding)
          for k, d in dtypes.items()}


def lowered_step(config: ConfigDict, cfg: ModelConfig, peft: PeftConfig, mesh: Mesh, rules: Rules,
                 global_batch: int, micro_batches: int):
  """(jax.stages.Lowered train step, abstract state): exactly what the stages jit, on shapes."""
  built = build_step(init_fn=decoder_init(cfg, peft), optimizer=config.optimizer,
                     total_steps=config.train.steps, mesh=mesh, rules=rules,
                     loss_fn=lm_loss_fn(cfg, peft, deterministic=False),
                     micro_batches=micro_batches)
  batch = abstract_batch(global_batch, seq_len_of(config), built.batch_sharding)
  return built.train_step.lower(built.abstract, batch), built.abstract


# Custom calls that carry shardings, not work.
_SHARDING_CALLS = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape")
# What an attention kernel's custom call is called in a lowered program.
ATTENTION_CALLS = {"tpu_custom_call": "Pallas/Mosaic TPU kernel",
                   "__cudnn$fmha": "cuDNN fused attention"}


def custom_calls(mlir_text: str) -> dict[str, int]:
  """Custom-call targets of a lowered StableHLO module and how often each occurs (sharding
  annotations left out)."""
  found: dict[str, int] = {}
  for a, b in re.findall(r'custom_call @([\w$.\-]+)|call_target_name = "([^"]+)"', mlir_text):
    name = a or b
    if name not in _SHARDING_CALLS:
      found[name] = found.get(name, 0) + 1
  return found


def attention_kernels(calls: dict[str, int]) -> list[str]:
  """The fused-attention kernels among `custom_calls`' targets, described."""
  return [f"{ATTENTION_CALLS[prefix]} ({name})" for name in sorted(calls)
          for prefix in ATTENTION_CALLS if name.startswith(prefix)]


def for_platform(cfg: ModelConfig, platform: str) -> ModelConfig:
  """`cfg` with its backend-dependent choices (attention, layer streams) made for `platform`
  instead of for the host this process runs on."""
  from research.models import attention as attention_lib  # pylint: disable=import-outside-toplevel
  return cfg.replace(attention=attention_lib.resolve(cfg.attention, platform, cfg.dtype,
                                                     cfg.attn_logit_softcap))


def exported_step(config: ConfigDict, cfg: ModelConfig, peft: PeftConfig, mesh: Mesh,
                  rules: Rules, global_batch: int, micro_batches: int, platform: str
                  ) -> tuple[str, ModelConfig]:
  """(StableHLO text of the train step lowered for `platform` ("cuda" or "tpu"), the model config
  it ran): the model's choices made for that platform, the program the target would run."""
  target = for_platform(cfg, platform)
  built = build_step(init_fn=decoder_init(target, peft), optimizer=config.optimizer,
                     total_steps=config.train.steps, mesh=mesh, rules=rules,
                     loss_fn=lm_loss_fn(target, peft, deterministic=False),
                     micro_batches=micro_batches)
  batch = abstract_batch(global_batch, seq_len_of(config), built.batch_sharding)
  with _cudnn_version_for_lowering(platform):
    # Lowered, not serialised: cuDNN attention's sharding rules are Python callbacks, which a
    # jax.export serialisation refuses; the module text is the same.
    lowered = built.train_step.trace(built.abstract, batch).lower(lowering_platforms=(platform,))
  return lowered.as_text(), target


@contextlib.contextmanager
def _cudnn_version_for_lowering(platform: str, version: int = 90800):
  """jax asks the local cuDNN for its version when it traces cuDNN attention, and a CPU host has
  none: for a "cuda" export from such a host, answer with a recent version (the lowering does not
  depend on it beyond feature checks) so the target's program can be inspected."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
  except ImportError:
    yield
    return
  try:
    fa.check_cudnn_version()
    has_cudnn = True
  except RuntimeError:
    has_cudnn = False
  if platform != "cuda" or has_cudnn:
    yield
    return
  original = fa.check_cudnn_version
  fa.check_cudnn_version = lambda: version
  try:
    yield
  finally:
    fa.check_cudnn_version = original


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def count(tree: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls: all but the input embedding (a gather), unless tied."""
  n = cfg.num_params()
  return n if cfg.tie_embeddings else n - cfg.vocab_size * cfg.hidden_size


def model_flops(cfg: ModelConfig, tokens: int, seq_len: int, peft_params: int = 0,
                base_trains: bool = True) -> dict[str, float]:
  """Training FLOPs per step: 6·N·tokens (2 forward, 2 activation grads, 2 weight grads; frozen
  weights skip the weight grads) plus attention: QK^T and PV over the full T×S, 4·T·S·H·D forward
  per row and layer, twice that backward. That is PaLM's convention; `attend`'s causal query
  blocks skip the never-visible blocks, so XLA counts less."""
  n_all = matmul_params(cfg) + peft_params
  trained = n_all if base_trains else peft_params
  dense = (4 * n_all + 2 * trained) * tokens
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len * tokens
  return {"dense": float(dense), "attention": float(attention), "total": float(dense + attention)}


def _sharded_dim(size: int, name: str, mesh: Mesh, rules: Rules) -> int:
  spec = logical_to_spec((name,), (size,), mesh, rules)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
  return size // math.prod(mesh.shape[a] for a in axes)


def activation_estimate(cfg: ModelConfig, peft: PeftConfig, mesh: Mesh, rules: Rules,
                        rows_per_device: int, seq_len: int, trained_bytes_f32: int
                        ) -> dict[str, float]:
  """Activation and temporary bytes per device from shapes alone (no compiler): what the backward
  pass keeps per layer under the remat policy, one layer's recompute working set, the logits and
  the gradients. Coarse (fusion can drop or add copies): a cross-check for XLA's number."""
  e, d, s, L = cfg.hidden_size, cfg.resolved_head_dim, seq_len, cfg.num_layers
  h = _sharded_dim(cfg.num_heads, "heads", mesh, rules)
  k = _sharded_dim(cfg.num_kv_heads, "kv_heads", mesh, rules)
  f = _sharded_dim(cfg.mlp_dim, "mlp", mesh, rules)
  v = _sharded_dim(cfg.vocab_size, "vocab", mesh, rules)
  c = jnp.dtype(cfg.dtype).itemsize
  tokens = rows_per_device * seq_len
  # Per token and layer, in elements of the compute dtype, what autodiff keeps with no remat:
  # norms' inputs/outputs, q/k/v (+rotated q/k), k/v at query-head width (2·h·d, an over-count:
  # `attend` reads K/V per KV head and never repeats them), attention output, gate/up/swiglu;
  # attention keeps only each query row's float32 max and sum (`attend` recomputes the
  # probabilities in its backward). While a layer runs, its float32 scores and cast probabilities
  # exist for a moment: they count in the working set, not in what is kept.
  dense_all = 4 * e + (h + 2 * k) * d + (h + k) * d + 2 * h * d + h * d + 3 * f
  row_stats = h * 2 * 4
  scores = h * s * (4 + c)
  dots_no_batch = (2 * e + (h + 2 * k) * d + 3 * f) * c
  per_token = {
      "none": dense_all * c + row_stats,
      "full": e * c,
      "dots": (2 * e + (h + 2 * k) * d + h * d + 3 * f) * c + h * s * 4,
      "dots_no_batch": dots_no_batch,
      # + rotated q/k and attention's output, plus its row statistics
      "dots_attention": dots_no_batch + ((h + k) * d + h * d) * c + row_stats,
  }[cfg.remat_policy]
  saved = per_token * tokens * L
  # The layer being differentiated holds its full set plus gradients of the same size.
  working = (scores if cfg.remat_policy == "none" else 2 * (dense_all * c + scores)) * tokens
  # float32 logits and their gradient, of one chunk when the LM loss is chunked (plus the hidden
  # states' gradient it keeps), else of every token (token_nll's closed form).
  chunk = min(tokens, cfg.loss_chunk_tokens or tokens)
  logits = 2 * chunk * v * 4 + (tokens * e * c if chunk < tokens else 0)
  return {"saved_activations": float(saved), "layer_working_set": float(working),
          "logits": float(logits), "logits_traffic": float(2 * tokens * v * 4),
          "gradients": float(trained_bytes_f32),
          "total": float(saved + working + logits + trained_bytes_f32)}


def _cost(stage) -> dict[str, float]:
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def probe_cost(config: ConfigDict, cfg: ModelConfig, peft: PeftConfig, mesh: Mesh, rules: Rules,
               compiled: bool) -> dict[str, float]:
  """Per-device FLOPs and bytes accessed of one step, from XLA's HLO cost analysis.

  XLA counts a while loop's body once, so a scanned stack (and the micro-batch scan) is
  undercounted. Instead: the step unrolled with 1 and 2 layers, on one micro-batch, extrapolated
  linearly to L layers and multiplied by the micro-batches (counting the optimizer update once per
  micro-batch: negligible). `compiled` analyses the partitioned per-device programs; otherwise the
  unpartitioned global program (no compile: seconds) divided by the device count.
  """
  micro = int(config.train.micro_batches)
  rows = int(config.train.global_batch) // micro
  costs = []
  for layers in (1, 2):
    # Unchunked LM loss too: the same FLOPs, and no loop for XLA to count once.
    probe_cfg = cfg.replace(num_layers=layers, scan_layers=False, loss_chunk_tokens=0)
    lowered, _ = lowered_step(config, probe_cfg, peft, mesh, rules, rows, 1)
    if compiled:
      costs.append(_cost(lowered.compile()))
    else:
      costs.append({k: x / mesh.size for k, x in _cost(lowered).items()})
  out = {}
  for key in ("flops", "bytes_accessed"):
    per_layer = costs[1][key] - costs[0][key]
    out[key] = micro * (costs[0][key] + (cfg.num_layers - 1) * per_layer)
  return out


def hbm_traffic_floor(cfg: ModelConfig, mesh: Mesh, micro_batches: int, trained_per_device: int,
                      estimate: dict[str, float]) -> float:
  """Bytes each device must move through HBM per step, from shapes: the (gathered) weights read
  forward, backward and again when rematerialising, per micro-batch; the AdamW update (read
  params, grads, mu, nu; write params, mu, nu: 7 x 4 bytes per trained param); activations,
  working set and every token's logits (chunked or not) each written once and read once."""
  c = jnp.dtype(cfg.dtype).itemsize
  passes = 2 + (cfg.remat_policy != "none")
  weights = matmul_params(cfg) / mesh.shape["tensor"] * c * passes
  activations = 2 * (estimate["saved_activations"] + estimate["layer_working_set"] +
                     estimate["logits_traffic"])
  return float(micro_batches * (weights + activations) + 7 * 4 * trained_per_device)


@dataclasses.dataclass
class Plan:
  """What `plan_step` found; bytes and FLOPs are per device."""
  devices: int
  mesh: dict[str, int]
  accelerator: Accelerator
  params: int
  trained_params: int
  global_batch: int
  micro_batches: int
  seq_len: int
  remat_policy: str
  dtype: str
  memory: dict[str, float]  # params, frozen, opt_state, other_state, batch, temps, total
  memory_method: str
  xla_memory: dict[str, float] | None  # compiled.memory_analysis() fields
  estimate: dict[str, float]  # activation_estimate parts, per micro-batch
  flops_xla: float
  flops_method: str
  flops_model: dict[str, float]  # dense, attention, total
  traffic_floor: float  # hbm_traffic_floor
  xla_bytes_accessed: float | None  # XLA:CPU's count (compiled probes): fuses less than GPU/TPU
  compile_s: float
  attention: str  # the attention implementation the target platform runs
  custom_calls: dict[str, int]  # custom-call targets of the step lowered for the target platform

  @property
  def tokens(self) -> int:
    return self.global_batch * self.seq_len

  @property
  def fits(self) -> bool:
    return self.memory["total"] <= self.accelerator.usable_bytes

  @property
  def peak_flops(self) -> float:
    return self.accelerator.peak_flops(self.dtype)

  def roofline(self) -> dict[str, Any]:
    """Lower bound on step time: XLA's FLOPs at the compute dtype's peak or the HBM traffic floor
    at full bandwidth, whichever is longer (communication is not modelled).

    `model_flops_share` is model FLOPs over XLA's FLOPs (what remat and masked work add).
    `mfu_bound` is model FLOPs over (step time x peak): an MFU bound only when the step is
    HBM-bound; when compute-bound it equals the share, and is None."""
    compute_s = self.flops_xla / self.peak_flops
    memory_s = self.traffic_floor / self.accelerator.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    bound = "memory" if memory_s > compute_s else "compute"
    return {"compute_s": compute_s, "memory_s": memory_s, "step_s": step_s, "bound": bound,
            "model_flops_share": self.flops_model["total"] / self.flops_xla,
            "mfu_bound": (self.flops_model["total"] / (step_s * self.peak_flops)
                          if bound == "memory" else None),
            "tokens_per_s": self.tokens / step_s}

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(fits=self.fits, roofline=self.roofline(), tokens=self.tokens)
    return d


def _memory(state: TrainState, compiled, rows: int, seq_len: int, estimate: dict[str, float]
            ) -> tuple[dict[str, float], dict[str, float] | None, str]:
  parts = {"params": shard_bytes(state.params), "frozen": shard_bytes(state.frozen),
           "opt_state": shard_bytes(state.opt_state),
           "other_state": shard_bytes((state.step, state.rng)),
           "batch": float(rows * seq_len * 4 * 5)}
  fixed = sum(parts.values())
  parts["estimate_total"] = fixed + estimate["total"]
  analysis = compiled.memory_analysis() if compiled is not None else None
  if analysis is None:
    parts.update(temps=estimate["total"], total=parts["estimate_total"])
    return parts, None, "computed from shapes (no XLA memory analysis here)"
  xla = {k: float(getattr(analysis, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes")}
  # The step's peak: its inputs, its temps, and outputs that could not reuse a donated input.
  parts.update(temps=xla["temp_size_in_bytes"],
               total=xla["argument_size_in_bytes"] + xla["temp_size_in_bytes"] +
               xla["output_size_in_bytes"] - xla["alias_size_in_bytes"])
  return parts, xla, ("XLA memory analysis of the compiled step (arguments + temps + outputs "
                      "not aliased)")


def plan_step(config: ConfigDict, accelerator: str | Accelerator, devices: int | None = None,
              compiled_probes: bool = True) -> Plan:
  """Compiles the train step of `config` on `devices` (default: all) on abstract shapes."""
  acc = get_accelerator(accelerator) if isinstance(accelerator, str) else accelerator
  available = jax.devices()
  n = devices or len(available)
  if n > len(available):
    raise ConfigError(f"planning on {n} devices but this process sees {len(available)}: set "
                      f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts")
  mesh = make_mesh({a: config.mesh[a] for a in ("data", "fsdp", "tensor")}, available[:n])
  rules = setup.rules_from(config)
  cfg, peft = model_and_peft(config)
  gb, micro = int(config.train.global_batch), int(config.train.micro_batches)
  seq = seq_len_of(config)
  shards = batch_shard_count(mesh, rules)
  if gb % (micro * shards):
    raise ConfigError(f"train.global_batch={gb} is not divisible by micro_batches={micro} x the "
                      f"{shards} batch shards of mesh {dict(mesh.shape)}")
  module, target = exported_step(config, cfg, peft, mesh, rules, gb, micro, acc.platform)
  calls = custom_calls(module)
  if "CustomSPMDPartitioning" in calls:
    # A kernel with its own sharding rules (cuDNN attention) becomes its custom call only when
    # partitioned; on one device it is inlined, so one device's share of the step names it.
    one = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, available[:1])
    inner, _ = exported_step(config, cfg, peft, one, rules, gb // shards // micro, 1,
                             acc.platform)
    calls.update({k: v for k, v in custom_calls(inner).items() if k not in calls})
  # Memory and FLOPs come from the step compiled here, on host CPU devices, so with a kernel the
  # host can compile (the target's fused kernel keeps the same per-row statistics) and with the
  # target's layer streams.
  cfg = for_platform(cfg, "cpu").replace(layer_streams=target.layer_streams or 1)
  t0 = time.perf_counter()
  lowered, state = lowered_step(config, cfg, peft, mesh, rules, gb, micro)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  trained = shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                                     sharding=x.sharding),
                                     state.params))
  estimate = activation_estimate(cfg, peft, mesh, rules, gb // shards // micro, seq, trained)
  memory, xla_memory, memory_method = _memory(state, compiled, gb // shards, seq, estimate)

  xla_bytes = None
  if not cfg.scan_layers and micro == 1:  # no loops: the compiled step's own count is exact
    cost = _cost(compiled)
    flops, xla_bytes = cost["flops"], cost["bytes_accessed"]
    flops_method = "XLA cost analysis of the compiled step"
  else:
    cost = probe_cost(config, cfg, peft, mesh, rules, compiled_probes)
    flops, xla_bytes = cost["flops"], cost["bytes_accessed"] if compiled_probes else None
    flops_method = (f"XLA cost analysis of {'compiled' if compiled_probes else 'lowered'} 1- and "
                    f"2-layer unrolled steps, extrapolated to {cfg.num_layers} layers x {micro} "
                    "micro-batch(es) (XLA counts a loop body once)")
  base_trains = peft.method == "none"
  model = model_flops(cfg, gb * seq, seq, peft_params=0 if base_trains else count(state.params),
                      base_trains=base_trains)
  return Plan(
      devices=n, mesh=dict(mesh.shape), accelerator=acc, params=cfg.num_params(),
      trained_params=count(state.params), global_batch=gb, micro_batches=micro, seq_len=seq,
      remat_policy=cfg.remat_policy, dtype=cfg.dtype, memory=memory,
      memory_method=memory_method, xla_memory=xla_memory, estimate=estimate, flops_xla=flops,
      flops_method=flops_method, flops_model={k: v / n for k, v in model.items()},
      traffic_floor=hbm_traffic_floor(cfg, mesh, micro, trained // 4, estimate),
      xla_bytes_accessed=xla_bytes, compile_s=compile_s,
      attention=target.attention, custom_calls=calls)
