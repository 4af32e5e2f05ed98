"""Two processes on 127.0.0.1 with jax.distributed: same result as NumPy."""

import pathlib
import socket
import subprocess
import sys

import numpy as np

import references

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parents[1]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_training_matches_numpy_reference(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  y = (x @ rng.normal(size=(16, 4))).astype(np.float32)
  np.savez(tmp_path / "data.npz", x=x, y=y)

  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(i), port, str(tmp_path)], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  d = 16 * 4 + 4
  k = round(0.1 * d)
  w, b, memory = references.linear_regression_top_k_ef(x, y, 8, steps=5, k=k,
                                                        lr=0.1)
  for i in range(2):
    got = np.load(tmp_path / f"process{i}.npz")
    np.testing.assert_allclose(got["w"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["b"], b, rtol=1e-4, atol=1e-5)
    # Each process holds the error memory of its own 4 workers.
    np.testing.assert_array_equal(got["memory_rows"], np.arange(4) + 4 * i)
    np.testing.assert_allclose(got["memory"], memory[4 * i:4 * i + 4],
                               rtol=1e-4, atol=1e-5)
    assert got["sent_bytes"] == 5 * k * 8


def test_multihost_example_runs_on_two_local_processes():
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "multihost.py"),
       "--launch-local", "2", "--steps", "3"], cwd=ROOT, capture_output=True,
      text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = sorted(l for l in result.stdout.splitlines()
                 if l.startswith("process "))
  assert len(lines) == 2
  # Both processes hold the same replicated model after the same steps.
  assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1]
  # top_k(0.01) of the 26,122-parameter MLP: k = 261 (value + int32 index).
  assert "sent 2088 B/step each" in lines[0]
