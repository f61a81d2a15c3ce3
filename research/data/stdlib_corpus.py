"""The default corpus that needs no download: the running interpreter's standard-library `.py` sources.

Written as `.jsonl` (`text`, `path` fields) so the normal corpus reader reads it like any other.
"""

from __future__ import annotations

import json
import os
import sysconfig

from research.errors import DataError

DEFAULT_MAX_BYTES = 4_000_000
# Tests and bundled tools are large and repetitive; site-packages is not the standard library.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                           "lib2to3", "__pycache__"})


def stdlib_sources(max_bytes: int = DEFAULT_MAX_BYTES,
                   stdlib_dir: str | None = None) -> list[tuple[str, str]]:
  """Returns `(relative_path, source)` pairs in sorted path order, stopping before the first file
  that would take the total UTF-8 size past `max_bytes`. Files that are not UTF-8 are skipped."""
  root = stdlib_dir or sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(root):
    raise DataError(f"standard library directory {root} does not exist: pass a corpus path "
                    "instead of the built-in one")
  relative_paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
    rel_dir = os.path.relpath(dirpath, root)
    relative_paths.extend(os.path.normpath(os.path.join(rel_dir, f)).replace(os.sep, "/")
                          for f in filenames if f.endswith(".py"))
  relative_paths.sort()

  sources, total = [], 0
  for rel in relative_paths:
    with open(os.path.join(root, rel), "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue
    if not text:
      continue
    if total + len(raw) > max_bytes:
      break
    sources.append((rel, text))
    total += len(raw)
  return sources


def write_stdlib_corpus(out_path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
  """Writes the standard-library corpus to `out_path` (`.jsonl`) and returns `out_path`.

  Deterministic for a given interpreter: same files, same order, same bytes.
  """
  if not out_path.endswith(".jsonl"):
    raise DataError(f"stdlib corpus path {out_path} must end in .jsonl so the corpus reader "
                    "takes it as JSON lines")
  sources = stdlib_sources(max_bytes)
  if not sources:
    raise DataError(f"no standard-library source fits in max_bytes={max_bytes}: raise it "
                    f"(the default is {DEFAULT_MAX_BYTES})")
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  # Write beside the target and rename, so a reader never sees a half-written corpus.
  tmp_path = f"{out_path}.tmp{os.getpid()}"
  with open(tmp_path, "w", encoding="utf-8") as f:
    for rel, text in sources:
      f.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
  os.replace(tmp_path, out_path)
  return out_path
