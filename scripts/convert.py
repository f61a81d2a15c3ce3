"""Convert between run directories and Hugging Face checkpoints (safetensors only).

  python -m scripts.convert to-hf WORKDIR OUT_DIR [--step N] [--dtype bfloat16] [--overwrite]
                                  [--architecture ARCH] [--max-shard-bytes B]
                                  [--allow-non-finite]
  python -m scripts.convert to-peft WORKDIR OUT_DIR [--base-dir BASE_OUT] [--step N] [--overwrite]
                                    [--dtype bfloat16] [--architecture ARCH]
  python -m scripts.convert from-hf HF_DIR WORKDIR
  python -m scripts.convert from-gguf FILE.gguf OUT [--to workdir|hf] [--overwrite]

ARCH is a Hugging Face model_type this decoder matches (research.models.config.HF_ARCHITECTURES;
the exporter names them when given another).

to-hf writes a LoRA run with its adapters merged into the weights; to-peft writes them as a PEFT
adapter dir beside the frozen base (in OUT_DIR/base, or --base-dir: exported there when missing,
referenced when it already holds this run's base). from-gguf dequantises a llama.cpp file (Llama,
Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text) to float32 and writes a run directory or a Hugging Face
dir, tokenizer and chat template included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from research.errors import UserError


def to_hf(args: argparse.Namespace) -> None:
  from research.interop.hf_export import export_hf
  from research.train.workdir import load_model, read_peft_config

  # load_model merges LoRA into the kernels (and refuses prompt tuning / adapters).
  cfg, params, tokenizer_dir, _ = load_model(args.workdir, step=args.step)
  out = export_hf(params, cfg, args.out_dir, architecture=args.architecture, dtype=args.dtype,
                  tokenizer=tokenizer_dir, max_shard_bytes=args.max_shard_bytes,
                  overwrite=args.overwrite, allow_non_finite=args.allow_non_finite)
  with open(os.path.join(out, "config.json")) as f:
    arch = json.load(f)["model_type"]
  step = "latest" if args.step is None else args.step
  merged = " with LoRA merged" if read_peft_config(args.workdir).method == "lora" else ""
  print(f"wrote {out} ({arch}, {args.dtype}{merged}) from {args.workdir} step {step}")


def to_peft(args: argparse.Namespace) -> None:
  from research.errors import CheckpointError
  from research.interop.peft_export import export_peft
  from research.train.workdir import load_run, read_model_config, read_peft_config

  read_model_config(args.workdir)  # a path that is no run dir is reported as such
  method = read_peft_config(args.workdir).method
  if method != "lora":
    raise CheckpointError(f"{args.workdir} was trained with peft.method={method!r}: to-peft "
                          "writes LoRA adapters only; use to-hf for a full fine-tune")
  cfg, peft, params, tokenizer_dir, _ = load_run(args.workdir, step=args.step)
  out, base = export_peft(params, cfg, peft, args.out_dir, base_dir=args.base_dir,
                          architecture=args.architecture, dtype=args.dtype,
                          tokenizer=tokenizer_dir, overwrite=args.overwrite)
  step = "latest" if args.step is None else args.step
  print(f"wrote {out} (LoRA r={peft.r}, {args.dtype}) on base {base} from {args.workdir} step "
        f"{step}")


def from_hf(args: argparse.Namespace) -> None:
  from research.errors import CheckpointError
  from research.interop.hf_config import model_config_from_hf
  from research.interop.hf_import import load_hf_checkpoint
  from research.parallel.mesh import make_mesh
  from research.train.workdir import param_shardings, write_initial_checkpoint

  config_path = os.path.join(args.hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{config_path} not found: {args.hf_dir} is not a Hugging Face model dir")
  with open(config_path) as f:
    cfg = model_config_from_hf(json.load(f))
  # FSDP over every device, so that a model larger than one device's memory still loads.
  _, shardings = param_shardings(cfg, make_mesh({"fsdp": -1}))
  cfg, params = load_hf_checkpoint(args.hf_dir, shardings=shardings)
  tokenizer = None
  if any(os.path.isfile(os.path.join(args.hf_dir, name))
         for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
  write_initial_checkpoint(args.workdir, cfg, params, tokenizer=tokenizer,
                           extra={"hf_source": os.path.abspath(args.hf_dir)})
  print(f"wrote {args.workdir} (step 0, {cfg.hf_architecture}, {cfg.num_params():,} params) from "
        f"{args.hf_dir}")


def from_gguf(args: argparse.Namespace) -> None:
  from research.interop.gguf_import import (gguf_model_config, gguf_to_hf_dir, gguf_tokenizer,
                                            load_gguf_checkpoint)
  from research.parallel.mesh import make_mesh
  from research.train.workdir import param_shardings, write_initial_checkpoint

  cfg = gguf_model_config(args.gguf_file)
  if args.to == "hf":
    gguf_to_hf_dir(args.gguf_file, args.out, overwrite=args.overwrite)
  else:
    if args.overwrite:
      raise UserError("--overwrite applies to --to=hf; a run directory is never overwritten")
    # FSDP over every device, so that a model larger than one device's memory still loads.
    _, shardings = param_shardings(cfg, make_mesh({"fsdp": -1}))
    tokenizer = gguf_tokenizer(args.gguf_file)
    cfg, params = load_gguf_checkpoint(args.gguf_file, shardings=shardings)
    write_initial_checkpoint(args.out, cfg, params, tokenizer=tokenizer,
                             extra={"gguf_source": os.path.abspath(args.gguf_file)})
  kind = "Hugging Face dir" if args.to == "hf" else "step 0"
  print(f"wrote {args.out} ({kind}, {cfg.hf_architecture}, {cfg.num_params():,} params, float32) "
        f"from {args.gguf_file}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scripts.convert", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-hf", help="run directory checkpoint -> Hugging Face dir")
  p.add_argument("workdir")
  p.add_argument("out_dir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--architecture", default=None,
                 help="ARCH (default: the one the model was imported from, else llama)")
  p.add_argument("--max-shard-bytes", type=int, default=5 * 10**9)
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
  p.add_argument("--allow-non-finite", action="store_true",
                 help="write weights holding NaN/inf instead of refusing them")
  p.set_defaults(func=to_hf)
  p = sub.add_parser("to-peft", help="LoRA run -> PEFT adapter dir (+ its exported base)")
  p.add_argument("workdir")
  p.add_argument("out_dir")
  p.add_argument("--base-dir", default=None,
                 help="where the base goes (default OUT_DIR/base); an existing export of this "
                      "run's base is referenced, not rewritten")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--architecture", default=None,
                 help="ARCH of the base (default: the one the model was imported from, else "
                      "llama)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
  p.set_defaults(func=to_peft)
  p = sub.add_parser("from-hf", help="Hugging Face dir -> new run directory (step-0 checkpoint)")
  p.add_argument("hf_dir")
  p.add_argument("workdir")
  p.set_defaults(func=from_hf)
  p = sub.add_parser("from-gguf", help="llama.cpp GGUF file -> run directory or Hugging Face dir")
  p.add_argument("gguf_file")
  p.add_argument("out")
  p.add_argument("--to", default="workdir", choices=("workdir", "hf"),
                 help="a run directory (step-0 checkpoint) or a Hugging Face dir")
  p.add_argument("--overwrite", action="store_true", help="replace an existing Hugging Face dir")
  p.set_defaults(func=from_gguf)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
