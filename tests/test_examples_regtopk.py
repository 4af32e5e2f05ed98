"""The RegTop-k examples: the toy's figures, the regression study's outputs."""

import json
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import regtopk_linear_regression  # noqa: E402
import regtopk_toy  # noqa: E402


def toy_reference(method, steps=150, lr=0.9, mu=1.0):
  """RegTop-k's two-worker logistic regression in float64 NumPy.

  Returns the mean loss before each step and after the last, ``[steps+1]``.
  """
  x = np.array([[100.0, 1.0], [-100.0, 1.0]])  # labels are both 1
  loss = lambda w: np.mean(np.logaddexp(0.0, -x @ w))
  w = np.array([0.0, 1.0])
  memory = np.zeros((2, 2))
  last_sent = np.zeros((2, 2))
  total = np.zeros(2)
  losses = [loss(w)]
  for _ in range(steps):
    grads = (1.0 / (1.0 + np.exp(-x @ w)) - 1.0)[:, None] * x
    if method == "dense":
      w = w - lr * grads.mean(0)
      losses.append(loss(w))
      continue
    a = grads + memory
    sent = np.zeros((2, 2))
    for i in range(2):
      score = np.abs(a[i])
      if method == "reg_top_k":
        was_sent = last_sent[i] != 0
        ratio = np.where(was_sent,
                         total / np.where(was_sent, last_sent[i], 1.0), 1e8)
        score = score * np.abs(np.tanh(ratio / mu))
      j = np.argsort(-score, kind="stable")[0]
      sent[i, j] = a[i, j]
    memory, last_sent, total = a - sent, sent, sent.sum(0)
    w = w - lr * total / 2
    losses.append(loss(w))
  return np.array(losses)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy")
  results = regtopk_toy.main(["--out", str(out)])
  return out, results


def test_toy_writes_json_and_plot(toy):
  out, results = toy
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert set(saved) == {"dense", "top_k", "reg_top_k"}
  assert all(len(r["loss"]) == 151 for r in saved.values())
  assert (out / "loss.png").stat().st_size > 0
  assert saved == json.loads(json.dumps(results))


def test_toy_top_k_stalls_and_reg_top_k_tracks_dense(toy):
  _, results = toy
  loss = {name: np.asarray(r["loss"]) for name, r in results.items()}
  # Hand figures (docs/algorithms.md, RegTop-k): the initial loss
  # log(1 + e^-1) = 0.313 ...
  np.testing.assert_allclose(loss["top_k"][0], np.log1p(np.exp(-1)),
                             rtol=1e-6)
  # ... where Top-k sits until the bias error outgrows the cancelling
  # entries (step 101 in float64; float32 may cross one step earlier) ...
  np.testing.assert_allclose(loss["top_k"][:96], 0.3133, atol=5e-5)
  assert loss["top_k"][110] < 1e-3
  # ... while RegTop-k follows dense SGD: ~0.021 after 50 steps.
  assert loss["reg_top_k"][50] == pytest.approx(0.021, abs=1e-3)
  assert loss["dense"][50] == pytest.approx(0.021, abs=1e-3)
  # (one entry per step: it alternates weight and bias, a staircase around
  # the dense curve, within 5% after 10 steps)
  np.testing.assert_allclose(loss["reg_top_k"][10:], loss["dense"][10:],
                             rtol=0.05)


@pytest.mark.parametrize("method", ["dense", "top_k", "reg_top_k"])
def test_toy_matches_numpy_reimplementation(toy, method):
  _, results = toy
  got = np.asarray(results[method]["loss"])
  expected = toy_reference(method)
  horizon = 96 if method == "top_k" else 151  # float32 may jump a step early
  np.testing.assert_allclose(got[:horizon], expected[:horizon], rtol=2e-3,
                             atol=1e-6)


def test_linear_regression_runs_every_method_and_the_sweep(tmp_path):
  argv = ["--rounds", "30", "--workers", "4", "--dim", "20", "--samples",
          "60", "--ratio", "0.3", "--sweep", "--sweep-ratios", "0.4",
          "--sweep-mus", "4", "--reject-steps", "--out", str(tmp_path)]
  returned = regtopk_linear_regression.main(argv)
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  methods = {"dense", "top_k", "reg_top_k", "hard_threshold", "gaussian_k"}
  assert set(results) == methods
  for r in results.values():
    assert len(r["curve"]) == 31
    assert r["final_log10_dist"] == r["curve"][-1]
    assert np.isfinite(r["curve"]).all()
    assert r["curve"][-1] < r["curve"][0]  # every method makes progress
    assert r["rejected_steps"] == 0
  assert results["dense"]["density"] == 1.0
  assert results["top_k"]["density"] == pytest.approx(0.3)
  assert results["hard_threshold"]["threshold"] > 0
  for name in ("distance.png", "sweep.png", "sweep.json"):
    assert (tmp_path / name).stat().st_size > 0
  sweep = returned["sweep"]
  assert sweep["ratios"] == [0.4] and sweep["mus"] == [4.0]
  assert len(sweep["top_k"]) == len(sweep["reg_top_k"]["4.0"]) == 1


def test_linear_regression_rounds_to_fraction():
  curve = np.log10([4.0, 1.0, 0.05, 0.041, 0.01])
  assert regtopk_linear_regression.rounds_to_fraction(curve) == 4
  assert regtopk_linear_regression.rounds_to_fraction(curve[:4]) is None


def test_linear_regression_gram_form_is_the_same_gradient():
  data = regtopk_linear_regression.make_data(3, 6, 20, seed=1,
                                             dtype=np.float64)
  a, y, _, x0 = data
  gram, b, _, _ = regtopk_linear_regression.gram_form(data)
  for worker in range(3):
    np.testing.assert_allclose(
        regtopk_linear_regression.gram_grad(x0, gram[worker], b[worker]),
        regtopk_linear_regression.mse_grad(x0, a[worker], y[worker]),
        rtol=1e-12, atol=1e-12)


def test_linear_regression_reject_study_both_dtypes():
  # reject_factor 0: no displacement is below 0 times the last one, so after
  # the first step (bound 1e5) every step is undone and the iterate stays.
  study = regtopk_linear_regression.reject_study(
      ratios=[0.5], seeds=range(2), rounds=12, reject_factor=0.0, workers=4,
      dim=10, samples=30, curve_every=1)
  assert study["ratios"] == [0.5] and study["seeds"] == [0, 1]
  for dtype in ("float32", "float64"):
    rows = study[dtype]
    assert set(rows) == set(regtopk_linear_regression.REJECT_METHODS)
    rejected = rows["reg_top_k+reject"][0]
    np.testing.assert_allclose(rejected["rejected_fraction"], 11 / 12)
    curve = np.asarray(rejected["curve"])
    assert curve.shape == (13,) and (curve[1:] == curve[1]).all()
    assert curve[1] < curve[0]  # the first step was taken
    for name in ("top_k", "reg_top_k"):
      assert rows[name][0]["rejected_fraction"] == [0.0, 0.0]
      assert len(rows[name][0]["final"]) == 2
  # The two precisions agree while the runs are far from the noise floor.
  np.testing.assert_allclose(study["float32"]["top_k"][0]["curve"],
                             study["float64"]["top_k"][0]["curve"],
                             atol=1e-4)
