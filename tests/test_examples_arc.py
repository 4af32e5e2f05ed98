"""The ARC-Top-K examples run, and show what they claim (at reduced size)."""

import importlib.util
import json
import os
import sys

import numpy as np

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _load(name):
  """Imports ``examples/<name>.py`` (registered, as dataclasses need)."""
  module_name = f"_example_{name}"
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        module_name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
  return sys.modules[module_name]


def test_synthetic_optimum_is_a_stationary_point():
  synthetic = _load("arc_synthetic")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  xi, gamma = synthetic.worker_constants()
  w_star = jnp.asarray(synthetic.optimum(), jnp.float32)
  grads = [synthetic.worker_gradient(w_star, a, b) for a, b in zip(xi, gamma)]
  assert np.abs(np.mean(grads, axis=0)).max() < 1e-4
  # but no worker's own gradient is zero there: |xi + gamma w_s*| / 150.
  np.testing.assert_allclose(np.abs(grads[0][:1500]), 4.0385 / 150, rtol=1e-3)
  np.testing.assert_allclose(synthetic.optimum().reshape(200, 10)[150],
                             -499 / 26)


def test_synthetic_top_k_ef21_stalls_and_arc_top_k_converges():
  # 300 of the 1000 steps: Top-k + EF21 has plateaued by step ~200 at ~0.10
  # (its sends are the workers' large noise rows, which cancel), while
  # ARC-Top-K + EF21 is at ~0.002, close to dense.
  synthetic = _load("arc_synthetic")
  results = synthetic.run_all(steps=300, compressors=["top_k", "arc_top_k"],
                              feedbacks=["ef21"])
  top_k = np.asarray(results["top_k+ef21"]["distance"])
  arc = np.asarray(results["arc_top_k+ef21"]["distance"])
  assert top_k[-1] > 0.05
  assert abs(top_k[-1] - top_k[219]) < 0.02 * top_k[-1]  # a plateau
  assert arc[-1] < 0.01
  assert arc[-1] < top_k[-1] / 10


def test_arc_topk_digits_runs_tiny_and_reports_every_method(tmp_path):
  example = _load("arc_topk")
  results = example.main(["--steps", "4", "--eval-every", "2",
                          "--batch-per-worker", "4", "--out",
                          str(tmp_path)])
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  names = {"dense", "top_k+ef", "top_k+ef21m", "arc_top_k+ef21m",
           "rand_k+ef21m"}
  assert set(saved["methods"]) == names == set(results)
  assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0
  budget = saved["methods"]["top_k+ef"]["sent_bytes_per_step"]
  for name, r in saved["methods"].items():
    assert r["workers"] == 8
    assert 0.0 <= r["accuracy"] <= 1.0 and len(r["curve"]["accuracy"]) == 2
    if name != "dense":  # the same byte budget, measured by comm_stats
      assert abs(r["sent_bytes_per_step"] - budget) <= 0.02 * budget, name
  assert saved["methods"]["dense"]["sent_bytes_per_step"] > 5 * budget
