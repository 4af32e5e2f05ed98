"""The reproduction report and the studies it runs."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import hard_threshold_study  # noqa: E402
import memsgd_logistic  # noqa: E402
import probe_training  # noqa: E402
import regtopk_linear_regression  # noqa: E402
import reproduce  # noqa: E402


def test_tiny_report_writes_the_page_and_every_figure(tmp_path):
  figures = tmp_path / "figures"
  sections = reproduce.main(["--tiny", "--out", str(figures)])
  page = (tmp_path / "reproductions.md").read_text()
  # The verdict table: one row per paper, in SECTIONS order.
  rows = re.findall(r"^\| \[(\d)\. (.*?)\]\(#.*?\) \| .*? \| \*\*(.*?)\*\*",
                    page, flags=re.M)
  assert [int(n) for n, _, _ in rows] == list(
      range(1, len(reproduce.SECTIONS) + 1))
  assert [s.key for s in sections] == list(reproduce.SECTIONS)
  for (_, paper, verdict), section in zip(rows, sections):
    assert paper == section.paper
    assert verdict in ("reproduced", "partly", "not reproduced")
  # Every figure the page links exists and is a PNG.
  linked = re.findall(r"\]\((figures/[\w.]+\.png)\)", page)
  assert set(linked) == {f"figures/{f}" for s in sections for f in s.figures}
  for path in linked:
    with open(tmp_path / path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert (figures / "reproductions.json").stat().st_size > 0


def test_probe_training_is_the_library_error_feedback():
  """The written-out EF loop follows `gs.sparsify`'s EF step for step."""
  problem = probe_training.regression_problem(0, workers=4, dim=12,
                                              samples=30)
  compressor = gs.top_k(k=3)
  probed = probe_training.ef_trajectory(problem, compressor, steps=25,
                                        lr=0.01)
  a, y, x_star = (np.asarray(v) for v in problem.data)
  library = regtopk_linear_regression.run_method(
      compressor, a, y, x_star, np.asarray(problem.x0), rounds=25, lr=0.01)
  np.testing.assert_allclose(probed["eval"], library["curve"][1:],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(probed["sent"], 3)  # k per worker per step


def test_hard_threshold_summary_counts_bytes_by_hand():
  # 2 steps x 2 workers, d = 10: counts [[1, 3], [2, 2]].
  run = {"passed": np.array([[1, 3], [2, 2]]),
         "error": np.array([[1.0, 2.0], [3.0, 4.0]]),
         "eval": np.array([0.5, 0.9])}
  s = hard_threshold_study.summarize(run, size=10)
  assert s["bytes"] == (3 + 5) / 2 * 8  # each worker's own count
  assert s["bytes_padded"] == (3 + 2) * 8  # the step's largest count
  assert s["total_error"] == (4 + 6) / 2
  assert s["density"] == 8 / 4 / 10 and s["max_worker_density"] == 0.3
  assert s["final"] == 0.9
  runs = [run]
  assert hard_threshold_study.overflow_fraction(runs, 2) == 1 / 8


def test_memsgd_applies_the_step_size_before_compressing():
  """Top-k Mem-SGD against the paper's algorithm in NumPy (float64)."""
  x, y = memsgd_logistic.make_data(0, samples=40, dim=8)
  reg, steps, eta0, t0, k = 1 / 40, 30, 2.0, 10.0, 2
  train = memsgd_logistic._trainer(gs.top_k(k=k), "ef", steps, steps, eta0,
                                   t0, reg)
  got = float(np.asarray(train(jnp.asarray(x), jnp.asarray(y),
                               jax.random.key(3)))[-1])
  # The same sample order as the jitted run.
  keys = jax.random.split(jax.random.split(jax.random.key(3), 1)[0], steps)
  order = [int(jax.random.randint(key, (), 0, 40)) for key in keys]
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  w, memory = np.zeros(8), np.zeros(8)
  for t, i in enumerate(order):
    margin = y64[i] * x64[i] @ w
    grad = -y64[i] * x64[i] / (1 + np.exp(margin)) + reg * w
    accumulated = memory + eta0 / (1 + t / t0) * grad
    sent = np.zeros(8)
    top = np.argsort(-np.abs(accumulated), kind="stable")[:k]
    sent[top] = accumulated[top]
    memory, w = accumulated - sent, w - sent
  expected = (np.mean(np.logaddexp(0, -y64 * (x64 @ w)))
              + 0.5 * reg * w @ w)
  assert got == pytest.approx(expected, rel=1e-4)
