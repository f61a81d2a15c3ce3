"""Plan a config's train step before renting the hardware: per-device memory, FLOPs per step and a
roofline step time on a named accelerator, and the attention kernel of the step lowered for it,
from the step compiled on host CPU devices with abstract shapes (nothing the size of the model is allocated).

  python scripts/plan.py --config=configs/plan_llama3_8b_fsdp.py [--accelerator=h100] \
      [--devices=8] [--config.train.global_batch=16 ...] [--fast] [--json=plan.json]

--devices defaults to the config's plan.devices, else the product of its mesh sizes. --fast takes
FLOPs from the uncompiled (global) program: no probe compiles, no XLA bytes-accessed figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Sequence

from research import sweeps  # no jax: the device count must be set before jax starts
from research.errors import UserError

GIB = 2 ** 30


def device_count(config, requested: int | None) -> int:
  if requested:
    return requested
  if "plan" in config and config.plan.get("devices"):
    return int(config.plan.devices)
  sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor")]
  if min(sizes) < 1:
    raise UserError("the mesh has a -1 axis and the config no plan.devices: pass --devices=N")
  return math.prod(sizes)


def use_host_devices(n: int) -> None:
  """n host CPU devices for the plan. XLA reads XLA_FLAGS when its first backend starts, not when
  jax is imported (a config file may import jax): too late only once a backend runs, and then
  planning checks that the devices suffice."""
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if xla_bridge.backends_are_initialized():
      return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # the platform flag was read at import
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def _g(x: float) -> str:
  return f"{x / GIB:8.2f}"


def _t(seconds: float) -> str:
  return f"{seconds:8.2f} s " if seconds >= 1 else f"{seconds * 1e3:8.1f} ms"


def format_plan(plan, name: str) -> str:
  from research import planning  # pylint: disable=import-outside-toplevel
  acc, m, est = plan.accelerator, plan.memory, plan.estimate
  r = plan.roofline()
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  fits = "fits" if plan.fits else "DOES NOT FIT"
  usable_note = (f" ({100 * acc.usable_bytes / acc.memory_bytes:.0f}% of {acc.memory_bytes / GIB:.0f}"
                 " GiB: JAX's GPU preallocation, XLA_PYTHON_CLIENT_MEM_FRACTION)"
                 if acc.usable_bytes < acc.memory_bytes else "")
  kernels = planning.attention_kernels(plan.custom_calls)
  calls = ", ".join(f"{k} x{v}" for k, v in sorted(plan.custom_calls.items())) or "none"
  if r["bound"] == "memory":
    verdict = (f"HBM-bound -> MFU <= {100 * r['mfu_bound']:.1f}%, "
               f"<= {r['tokens_per_s']:,.0f} tokens/s (communication not modelled)")
  else:
    verdict = (f"compute-bound at peak, <= {r['tokens_per_s']:,.0f} tokens/s (communication not "
               f"modelled); model FLOPs are {100 * r['model_flops_share']:.1f}% of XLA's "
               "(remat and masked work), not an MFU bound")
  lines = [
      f"plan: {name} on {plan.devices} x {acc.name} (mesh {mesh})",
      f"model: {plan.params / 1e9:.3g} B params, {plan.trained_params / 1e9:.3g} B trained; "
      f"{plan.dtype} compute, remat {plan.remat_policy}; batch {plan.global_batch} x "
      f"{plan.seq_len} = {plan.tokens:,} tokens/step in {plan.micro_batches} micro-batch(es)",
      f"compiled on {plan.devices} host CPU devices in {plan.compile_s:.1f} s, abstract shapes",
      f"attention on {acc.platform}: {plan.attention}; the step exported for {acc.platform} holds "
      + (f"{', '.join(kernels)}" if kernels else "no fused-attention kernel") +
      f" (custom calls: {calls})",
      "",
      "memory per device                     GiB",
      f"  params (trained)               {_g(m['params'])}",
      f"  frozen params                  {_g(m['frozen'])}",
      f"  optimizer state                {_g(m['opt_state'])}",
      f"  step, rng, batch               {_g(m['other_state'] + m['batch'])}",
      f"  activations + temps            {_g(m['temps'])}   "
      f"(shapes: {est['total'] / GIB:.2f} = saved {est['saved_activations'] / GIB:.2f} + layer "
      f"{est['layer_working_set'] / GIB:.2f} + logits {est['logits'] / GIB:.2f} + grads "
      f"{est['gradients'] / GIB:.2f})",
      f"  total                          {_g(m['total'])}   of {acc.usable_bytes / GIB:.1f} usable"
      f"{usable_note}: {fits} ({100 * m['total'] / acc.usable_bytes:.0f}%)",
      f"  method: {plan.memory_method}; from shapes alone: {m['estimate_total'] / GIB:.2f} GiB",
      "",
      f"FLOPs per step, per device (x{plan.devices} devices)",
      f"  XLA cost analysis          {plan.flops_xla / 1e12:10.2f} TFLOP   ({plan.flops_method})",
      f"  6·N·tokens + attention     {plan.flops_model['total'] / 1e12:10.2f} TFLOP   (dense "
      f"{plan.flops_model['dense'] / 1e12:.2f} + attention "
      f"{plan.flops_model['attention'] / 1e12:.2f}; XLA/model = "
      f"{plan.flops_xla / plan.flops_model['total']:.3f}, >1 with remat recompute)",
      "",
      f"roofline on {acc.name} ({plan.peak_flops / 1e12:.0f} TFLOP/s {plan.dtype} peak, "
      f"{acc.hbm_bandwidth / 1e12:.2f} TB/s HBM, {acc.memory_bytes / GIB:.0f} GiB)",
      f"  compute at peak            {_t(r['compute_s'])}",
      f"  HBM traffic floor          {_t(r['memory_s'])}   "
      f"({plan.traffic_floor / 1e9:.1f} GB from shapes" + (
          f"; XLA:CPU's bytes accessed, {plan.xla_bytes_accessed / 1e9:.0f} GB, not used: it "
          "fuses far less than GPU/TPU)"
          if plan.xla_bytes_accessed else ")"),
      f"  step time >= {_t(r['step_s']).strip()}: {verdict}",
  ]
  if not plan.fits:
    lines.append(f"WARNING: {m['total'] / GIB:.1f} GiB per device exceeds the "
                 f"{acc.usable_bytes / GIB:.1f} GiB usable on a {acc.name}: shrink the per-device batch "
                 "(micro_batches), remat more, or shard over more devices")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="FILE[:PRESET]; --config.x=y overrides follow")
  p.add_argument("--accelerator", default="", help="h100, h200, a100, v5e, v5p (default: config)")
  p.add_argument("--devices", type=int, default=0, help="devices to plan for (default: config)")
  p.add_argument("--fast", action="store_true", help="FLOPs from the uncompiled program")
  p.add_argument("--json", default="", help="also write the plan here")
  args, rest = sweeps.parse_with_overrides(p, sys.argv[1:] if argv is None else argv)
  try:
    config = sweeps.resolve_config(args.config, rest)
    n = device_count(config, args.devices)
    accelerator = args.accelerator or (config.plan.get("accelerator") if "plan" in config else "")
    if not accelerator:
      raise UserError("name the accelerator: --accelerator=h100|h200|a100|v5e|v5p")
    use_host_devices(n)
    from research import planning  # pylint: disable=import-outside-toplevel
    plan = planning.plan_step(config, accelerator, n, compiled_probes=not args.fast)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_plan(plan, args.config))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"config": args.config, **plan.to_dict()}, f, indent=2, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
