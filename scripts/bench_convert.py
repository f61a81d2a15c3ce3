"""Host memory of `scripts/convert.py to-hf`: peak RSS of the export against the model's bytes P.

  python -m scripts.bench_convert [--hidden 1024 --layers 16 --vocab 32000 --mlp 2816 ...]
                                  [--dtypes float32,bfloat16] [--workdir DIR] [--keep]

Writes a random model (numpy, no training) as a workdir, then runs in fresh child processes
(a) a baseline that imports what convert.py imports and loads the params, and (b) `to-hf` for each
dtype, and prints P, the peak RSS of each, and peak / P. The issue's target (#3): exporting a
model of P bytes takes no more than about 2 P of host memory (beyond the ~220 MiB of imports).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

MB = 2**20


def peak_rss_bytes() -> int:
  """This process's peak RSS. VmHWM belongs to the address space and restarts at exec; ru_maxrss
  would carry the parent's RSS at fork into the child, so it is only the fallback."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
  """Restarts VmHWM at the current RSS (Linux >= 4.0), so that one phase's peak can be read."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def current_rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_config(args: argparse.Namespace):
  from research.models.config import ModelConfig
  return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_dim=args.mlp,
                     hf_architecture="llama")


def write_random_workdir(args: argparse.Namespace, workdir: str) -> int:
  """A step-0 workdir of random float32 weights; returns their bytes P."""
  import jax
  import numpy as np

  from research.parallel.mesh import make_mesh
  from research.train.workdir import param_shardings, write_initial_checkpoint

  cfg = model_config(args)
  abstract, _ = param_shardings(cfg, make_mesh({"data": -1}))
  rng = np.random.default_rng(0)

  def fill(path, leaf) -> np.ndarray:
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    return rng.standard_normal(leaf.shape, np.float32) * np.float32(0.02)

  params = jax.tree_util.tree_map_with_path(fill, abstract)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  write_initial_checkpoint(workdir, cfg, params)
  return nbytes


def child(mode: str, workdir: str, out_dir: str, dtype: str) -> dict[str, Any]:
  """Runs in a fresh process: `baseline` loads the params, `export` is `convert.py to-hf`.

  The export's peak is also split into loading and writing: the writer's peak counts from a reset
  of VmHWM just before export_hf starts.
  """
  start = time.perf_counter()
  import jax

  from scripts import convert
  from research.interop import hf_export
  from research.train.workdir import load_model

  result: dict[str, Any] = dict(mode=mode, dtype=dtype, imported=current_rss_bytes())
  if mode == "baseline":
    _, params, _, _ = load_model(workdir)
    jax.block_until_ready(params)  # restored arrays may still be filling in the background
    result["holding"] = current_rss_bytes()
    del params
  else:
    export_hf = hf_export.export_hf

    def measured_export(params, *args, **kwargs):
      jax.block_until_ready(params)
      result["holding"] = current_rss_bytes()
      result["load_peak"] = peak_rss_bytes()
      if reset_peak_rss():
        out = export_hf(params, *args, **kwargs)
        result["write_peak"] = peak_rss_bytes()
        return out
      return export_hf(params, *args, **kwargs)

    hf_export.export_hf = measured_export  # to_hf imports it from the module when it runs
    rc = convert.main(["to-hf", workdir, out_dir, "--dtype", dtype, "--overwrite"])
    if rc:
      raise SystemExit(f"convert.py to-hf exited with {rc}")
  # After a reset VmHWM holds only the later phase, so the whole run's peak is the larger one.
  result["peak"] = max(peak_rss_bytes(), result.get("load_peak", 0))
  result["seconds"] = time.perf_counter() - start
  return result


def run_child(mode: str, workdir: str, out_dir: str = "", dtype: str = "float32",
              extra: Sequence[str] = ()) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "scripts.bench_convert", f"--child={mode}", f"--workdir={workdir}",
         f"--out={out_dir}", f"--dtypes={dtype}", *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="scripts.bench_convert", description=__doc__.splitlines()[0])
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--mlp", type=int, default=2816)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--workdir", default=None, help="reuse (or keep) the model workdir here")
  p.add_argument("--keep", action="store_true", help="keep the temporary workdir and exports")
  p.add_argument("--child", choices=("write", "baseline", "export"),
                 help="internal: one step in a fresh process")
  p.add_argument("--out", default=None, help="internal: the export dir of --child=export")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  if args.child == "write":
    print(json.dumps({"nbytes": write_random_workdir(args, args.workdir)}))
    return
  if args.child:
    print(json.dumps(child(args.child, args.workdir, args.out, args.dtypes)))
    return
  from research.train.workdir import is_workdir, read_model_config

  dtypes = [d for d in args.dtypes.split(",") if d]
  root = tempfile.mkdtemp(prefix="bench_convert-")
  workdir = args.workdir or os.path.join(root, "run")
  try:
    if is_workdir(workdir):
      print(f"reusing {workdir}")
    else:
      # Written by a child too, so that this process stays small: nothing here is measured.
      t = time.perf_counter()
      run_child("write", workdir, extra=_model_flags(args))
      print(f"wrote {workdir} in {time.perf_counter() - t:.1f}s")
    cfg = read_model_config(workdir)
    nbytes = cfg.num_params() * cfg.weight_dtype.itemsize
    print(f"model: hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
          f"mlp {cfg.mlp_dim}, heads {cfg.num_heads}/{cfg.num_kv_heads}: {cfg.num_params():,} "
          f"params, P = {nbytes / MB:,.0f} MiB ({cfg.param_dtype})")
    base = run_child("baseline", workdir)
    print(f"baseline (imports + load params): imports {base['imported'] / MB:,.0f} MiB, holding "
          f"the params {base['holding'] / MB:,.0f} MiB, peak while loading "
          f"{base['peak'] / MB:,.0f} MiB = {base['peak'] / nbytes:.2f} P")
    for dtype in dtypes:
      out = run_child("export", workdir, os.path.join(root, f"hf_{dtype}"), dtype)
      over = out["peak"] - base["holding"]
      # The imports' RSS is the same for any model, so the target is judged without it too.
      model_part = (out["peak"] - base["imported"]) / nbytes
      line = (f"to-hf {dtype:>8}: peak {out['peak'] / MB:,.0f} MiB = {out['peak'] / nbytes:.2f} P, "
              f"without the imports {model_part:.2f} P ({'meets' if model_part <= 2 else 'MISSES'} "
              f"<= 2 P); {over / MB:+,.0f} MiB over the baseline holding the params; "
              f"{out['seconds']:.1f}s")
      if "write_peak" in out:
        line += (f"\n  peak while loading {out['load_peak'] / MB:,.0f} MiB, while converting and "
                 f"writing {out['write_peak'] / MB:,.0f} MiB = the loaded params "
                 f"{max(0, out['write_peak'] - out['holding']) / MB:+,.0f} MiB")
      print(line)
  finally:
    if args.keep:
      print(f"kept {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)


def _model_flags(args: argparse.Namespace) -> list[str]:
  return [f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
          f"--mlp={args.mlp}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}"]


if __name__ == "__main__":
  main()
