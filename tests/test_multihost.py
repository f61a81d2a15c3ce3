"""Multi-host: the train step as 2 processes on localhost (jax.distributed, gloo CPU collectives,
2 host devices each, each process feeding its own rows) gives the single-process losses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker
from research.parallel.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
BOUND_S = 240  # then SIGKILL: jax.distributed catches SIGTERM
STEPS = 3


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(tmp_path, n=2):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs, outs, logs = [], [], []
  for pid in range(n):
    out, log = tmp_path / f"result_{pid}.json", tmp_path / f"log_{pid}.txt"
    cmd = [sys.executable, WORKER, f"--process_id={pid}", f"--num_processes={n}",
           f"--port={port}", "--local_devices=2", f"--steps={STEPS}", f"--out={out}"]
    with open(log, "w") as f:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True))
    outs.append(out)
    logs.append(log)
  return procs, outs, logs


def _wait(procs, outs, logs, deadline):
  """Results of the processes; any still running at `deadline` gets SIGKILL."""
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  tails = "\n".join(f"--- process {i} (rc {p.returncode}) ---\n" + log.read_text()[-2000:]
                    for i, (p, log) in enumerate(zip(procs, logs)))
  if any(p.returncode == multihost_worker.NO_GLOO_EXIT for p in procs):
    pytest.skip(f"{multihost_worker.NO_GLOO} on this jaxlib:\n{tails}")
  assert all(p.returncode == 0 for p in procs), tails
  return [json.loads(o.read_text()) for o in outs]


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives "
                    "(jax_cpu_collectives_implementation='gloo'), needed for multi-process CPU")
def test_two_processes_match_one(tmp_path):
  deadline = time.monotonic() + BOUND_S
  running = _start(tmp_path)
  try:  # the single-process reference (one device, the whole global batch) meanwhile
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    ref = multihost_worker.run_steps(mesh, STEPS, lambda b, s: jax.device_put(b, s))
  finally:
    results = _wait(*running, deadline)
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == 4 and r["local_devices"] == 2 for r in results)
  for r in results:
    np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norms"], ref["grad_norms"], rtol=1e-5)
  assert ref["losses"][-1] < ref["losses"][0]


_SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
          "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env,expected", [({}, None), (_SLURM, "SlurmCluster")])
def test_a_detected_cluster_initialises_without_flags(monkeypatch, env, expected):
  """Without --coordinator_address, a cluster jax can detect (here SLURM's variables) gets
  `jax.distributed.initialize()` with no arguments; none detected, nothing is called."""
  from research.parallel import distributed
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "TPU_", "KUBERNETES_")):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  assert distributed.detected_cluster() == expected
  assert distributed.maybe_initialize("", 1, 0) == (expected is not None)
  assert calls == ([((), {})] if expected else [])
  calls.clear()
  assert distributed.maybe_initialize("", 1, 0, auto=False) is False and not calls
