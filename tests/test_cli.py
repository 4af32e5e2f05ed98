"""The `gsparse` command: compare end to end, bad options, resume, info, bench.

Runs in-process through `gsparse_jax.cli.main` on the 8 CPU devices of the
test session, with tiny settings (a few dozen steps of the digits MLP).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import matplotlib.image
import numpy as np
import pytest

import gsparse_jax as gs
from gsparse_jax import cli
from gsparse_jax._src.cli import bench
from gsparse_jax._src.cli import training

MLP_PARAMS = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10  # 26,122
TINY = ["--batch-size", "8", "--eval-every", "8"]
RUN_KEYS = {"compressor", "feedback", "final_loss", "final_accuracy",
            "bytes_per_step_per_worker", "compression", "wall_s", "curves",
            "compute_s_per_step", "projected_comm_s", "projected_step_s",
            "steps_to_target", "time_to_target_s"}
# What a run measures on the clock, different in every process.
CLOCK_KEYS = ("wall_s", "compute_s_per_step", "projected_step_s",
              "time_to_target_s")


def gsparse(*argv) -> int:
  """Exit code of ``gsparse ARGV`` (argparse's errors exit by SystemExit).

  Runs with standard dtype promotion, as the command does for a user: its
  optimizers come from optax, whose adam is not clean under the suite's
  strict promotion (see tests/conftest.py).
  """
  try:
    with jax.numpy_dtype_promotion("standard"):
      return cli.main([str(a) for a in argv])
  except SystemExit as exit_:
    return exit_.code


def _results(out) -> dict:
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def _without_wall_time(results: dict) -> dict:
  drop = lambda run: {k: v for k, v in run.items() if k not in CLOCK_KEYS}
  return {"config": results["config"],
          "runs": [{**drop(run), "per_seed": [drop(r) for r in run[
              "per_seed"]]} for run in results["runs"]]}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  """One `gsparse compare` of dense and top_k: (results, stdout, out)."""
  out = tmp_path_factory.mktemp("compare")
  capture = tmp_path_factory.mktemp("stdout") / "stdout.txt"
  with open(capture, "w") as f:
    saved, sys.stdout = sys.stdout, f
    try:
      code = gsparse("compare", "--compressors", "dense,top_k", "--steps",
                     24, "--out", out, *TINY)
    finally:
      sys.stdout = saved
  assert code == 0
  return _results(out), capture.read_text(), out


def test_compare_prints_the_table_and_writes_results_and_plots(compared):
  results, stdout, out = compared
  for text in ("dense", "top_k", "test acc", "bytes/step", "vs dense",
               "comm/step", "to target", "1 Gbit/s", "results.json"):
    assert text in stdout
  config, runs = results["config"], results["runs"]
  assert config["task"] == "digits-mlp" and config["workers"] == 8
  assert config["num_params"] == MLP_PARAMS
  assert [run["compressor"] for run in runs] == ["dense", "top_k"]
  for run in runs:
    assert RUN_KEYS <= set(run)
    assert run["curves"]["step"] == list(range(1, 25))
    assert run["curves"]["eval_step"] == [8, 16, 24]
    assert run["final_accuracy"] == run["curves"]["eval_accuracy"][-1]
    assert run["final_accuracy"] > 0.3  # chance is 0.1
  dense, top_k = runs
  # Hand-computed: dense sends every float32; top_k(0.01) sends
  # round(0.01 * 26,122) = 261 (float32 value, int32 index) pairs.
  assert dense["bytes_per_step_per_worker"] == MLP_PARAMS * 4
  assert top_k["bytes_per_step_per_worker"] == 261 * 8
  assert top_k["compression"] == pytest.approx(MLP_PARAMS * 4 / (261 * 8))
  assert top_k["curves"]["eval_bytes"] == [8 * 261 * 8, 16 * 261 * 8,
                                           24 * 261 * 8]
  for name in ("accuracy_vs_step.png", "accuracy_vs_bytes.png",
               "accuracy_vs_time.png", "bytes_per_step.png"):
    image = matplotlib.image.imread(out / name)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def _ring_all_reduce_s(num_bytes, n, gbit, latency=5e-6):
  """By hand: 2 (n - 1) messages, each worker sends 2 (n - 1) / n of B."""
  return 2 * (n - 1) * latency + 2 * (n - 1) / n * num_bytes / (gbit * 1e9 / 8)


def test_projected_step_is_measured_compute_plus_modelled_comm(compared):
  results, stdout, _ = compared
  dense, top_k = results["runs"]
  network = gs.cost_model.network_from_gbit(1.0)  # the default link
  top_k_comm = gs.cost_model.project_compressor(
      gs.top_k(0.01), MLP_PARAMS, 8, network).communication_s
  # Dense: one ring all-reduce of the float32 gradient, worked by hand;
  # top_k: the cost model's all-gather of its 261 pairs.
  assert dense["projected_comm_s"] == pytest.approx(
      _ring_all_reduce_s(MLP_PARAMS * 4, 8, 1.0), rel=1e-12)
  assert top_k["projected_comm_s"] == pytest.approx(top_k_comm, rel=1e-12)
  for run in (dense, top_k):
    # A few milliseconds of compute on this machine, not nothing, and less
    # than the run's wall time per step (which also scores and compiles).
    assert 0 < run["compute_s_per_step"] < run["wall_s"] / 24 * 5
    assert run["projected_step_s"] == pytest.approx(
        run["compute_s_per_step"] + run["projected_comm_s"], rel=1e-12)
  # The default target: 95% of dense's final accuracy; each run's time to
  # it from its own curve, recomputed here.
  target = results["config"]["target"]
  assert target == pytest.approx(0.95 * dense["final_accuracy"])
  for run in (dense, top_k):
    curves = run["curves"]
    hits = [s for s, a in zip(curves["eval_step"], curves["eval_accuracy"])
            if a >= target]
    assert run["steps_to_target"] == (hits[0] if hits else None)
    assert run["time_to_target_s"] == (
        None if not hits else pytest.approx(hits[0] * run["projected_step_s"]))
  assert dense["time_to_target_s"] is not None  # it reaches 95% of itself
  assert "fastest to accuracy >= " in stdout


def test_time_to_target_on_a_hand_worked_curve():
  from gsparse_jax._src.cli import timing  # pylint: disable=g-import-not-at-top

  steps, accuracy = [10, 20, 30, 40], [0.50, 0.85, 0.90, 0.97]
  # First evaluation at or above 0.9 is step 30: 30 steps of 4 ms.
  assert timing.steps_to_target(steps, accuracy, 0.9, "accuracy") == 30
  assert timing.time_to_target(steps, accuracy, 0.9, "accuracy",
                               0.004) == pytest.approx(0.12)
  assert timing.time_to_target(steps, accuracy, 0.98, "accuracy", 1) is None
  # A loss falls to its target: first at or below 0.6 is step 20.
  assert timing.steps_to_target(steps, [2.0, 0.6, 0.7, 0.3], 0.6,
                                "loss") == 20
  runs = [{"compressor": "top_k", "final_accuracy": 0.9, "final_loss": 0.5},
          {"compressor": "dense", "final_accuracy": 0.8, "final_loss": 0.4}]
  assert timing.default_target(runs, "accuracy") == pytest.approx(0.76)
  assert timing.default_target(runs, "loss") == pytest.approx(0.42)
  # Without dense: within 5% of the best run.
  assert timing.default_target(runs[:1], "accuracy") == pytest.approx(0.855)
  assert timing.projected_step_seconds(0.003, 0.005) == pytest.approx(0.008)
  assert timing.projected_step_seconds(0.003, 0.005, overlap=True) == 0.005


def test_verdict_names_the_fastest_run_and_its_gain_over_cast():
  from gsparse_jax._src.cli import timing  # pylint: disable=g-import-not-at-top

  run = lambda name, seconds: {"compressor": name,
                               "time_to_target_s": seconds}
  line = timing.verdict([run("dense", 3.0), run("cast", 2.0),
                         run("top_k", 0.5), run("rand_k", None)], "acc")
  assert line == ("fastest to acc: top_k (0.5 s), 4.00x faster than cast "
                  "(2 s)")
  assert "cast never reached it" in timing.verdict(
      [run("cast", None), run("top_k", 1.0)], "acc")
  assert timing.verdict([run("cast", None)], "acc") == (
      "no compressor reached acc")


def test_every_compressor_keeps_one_distinct_style():
  from gsparse_jax._src.cli import figures  # pylint: disable=g-import-not-at-top

  names = ["dense", "cast", "top_k", "rand_k", "reg_top_k", "arc_top_k"]
  style = figures.styles(names, figures._pyplot())
  looks = {(s["color"], s["marker"], s["linestyle"]) for s in style.values()}
  assert len({s["color"] for s in style.values()}) == len(names)
  assert len(looks) == len(names)
  # Each run draws above the one before it, thinner: both stay visible.
  orders = [style[n]["zorder"] for n in names]
  widths = [style[n]["linewidth"] for n in names]
  assert orders == sorted(orders) and widths == sorted(widths, reverse=True)


def test_simulated_workers_match_shard_map(compared, tmp_path):
  results, _, _ = compared
  out = tmp_path / "simulated"
  assert gsparse("compare", "--compressors", "top_k", "--steps", 24,
                 "--simulate", "--overlap", "--out", out, *TINY) == 0
  (simulated,) = _results(out)["runs"]
  # --overlap: a step is the larger of compute and communication.
  assert simulated["projected_step_s"] == max(
      simulated["compute_s_per_step"], simulated["projected_comm_s"])
  shard_map = results["runs"][1]
  assert simulated["bytes_per_step_per_worker"] == shard_map[
      "bytes_per_step_per_worker"]
  np.testing.assert_allclose(simulated["curves"]["loss"],
                             shard_map["curves"]["loss"], rtol=1e-4)


# DiLoCo with a sync every 4 steps: 4 syncs in 16 steps.
DILOCO = ["--diloco", 4, "--steps", 16, *TINY]


@pytest.fixture(scope="module")
def diloco_compared(tmp_path_factory):
  """results.json of `compare --diloco 4` of dense and top_k."""
  out = tmp_path_factory.mktemp("diloco")
  assert gsparse("compare", "--compressors", "dense,top_k", *DILOCO,
                 "--out", out) == 0
  return _results(out)


def test_diloco_sends_once_per_sync(diloco_compared):
  config, runs = diloco_compared["config"], diloco_compared["runs"]
  assert (config["method"], config["sync_every"]) == ("diloco", 4)
  assert config["mapping"] == "vmap (simulated)"
  dense, top_k = runs
  assert [(r["method"], r["sync_every"]) for r in runs] == [("diloco", 4)] * 2
  # One float32 pseudo-gradient per sync, every 4 steps.
  assert dense["bytes_per_step_per_worker"] == MLP_PARAMS * 4 / 4
  assert dense["compression"] == 1.0
  assert top_k["bytes_per_step_per_worker"] < (
      dense["bytes_per_step_per_worker"] / 10)
  # A sync's projected communication over its 4 steps.
  network = gs.cost_model.network_from_gbit(1.0)
  assert dense["projected_comm_s"] == pytest.approx(
      gs.cost_model.project_compressor(gs.dense(), MLP_PARAMS, 8,
                                       network).communication_s / 4)
  assert dense["projected_step_s"] == pytest.approx(
      dense["compute_s_per_step"] + dense["projected_comm_s"])
  # Evaluations fall on syncs: the anchor scored is what every worker has.
  assert dense["curves"]["eval_step"] == [8, 16]


def test_diloco_every_step_with_sgd_is_data_parallel_sgd(tmp_path):
  """sync_every=1, SGD inside, outer SGD(1.0) without momentum and dense():
  data-parallel SGD (gs.diloco's docstring), step for step."""
  sgd = ["--compressors", "dense", "--optimizer", "sgd", "--lr", 0.1,
         "--steps", 16, *TINY]
  assert gsparse("compare", *sgd, "--simulate", "--out",
                 tmp_path / "dp") == 0
  assert gsparse("compare", *sgd, "--diloco", 1, "--outer-lr", 1,
                 "--outer-momentum", 0, "--out", tmp_path / "diloco") == 0
  (dp,) = _results(tmp_path / "dp")["runs"]
  (diloco,) = _results(tmp_path / "diloco")["runs"]
  assert dp["bytes_per_step_per_worker"] == diloco[
      "bytes_per_step_per_worker"] == MLP_PARAMS * 4
  for key in ("loss", "eval_loss", "eval_accuracy"):
    np.testing.assert_allclose(diloco["curves"][key], dp["curves"][key],
                               rtol=1e-5, err_msg=key)


def test_accumulation_equals_the_larger_batch_and_sends_once(compared,
                                                             tmp_path):
  """Two micro-batches of 4 per step: the same examples and mean gradient
  as one batch of 8 (batches are drawn in that order), the same bytes."""
  results, _, _ = compared
  assert gsparse("compare", "--compressors", "top_k", "--steps", 24,
                 "--eval-every", 8, "--batch-size", 4, "--accumulate", 2,
                 "--out", tmp_path) == 0
  (accumulated,) = _results(tmp_path)["runs"]
  one_batch = results["runs"][1]
  assert accumulated["bytes_per_step_per_worker"] == 261 * 8
  np.testing.assert_allclose(accumulated["curves"]["loss"],
                             one_batch["curves"]["loss"], rtol=1e-4)
  np.testing.assert_allclose(accumulated["final_loss"],
                             one_batch["final_loss"], rtol=1e-4)


BAD_OPTIONS = [
    (["--compressors", "top_k,nope"], "--compressors"),
    (["--compressors", "top_k:rnak=4"], "--compressors"),  # unknown key
    (["--compressors", "power_sgd:rank=-1"], "--compressors"),  # bad value
    (["--compressors", "power_sgd:rank=two"], "--compressors"),
    (["--compressors", "rank=4,top_k"], "--compressors"),  # no compressor
    (["--compressors", "power_sgd:rank=4:warm_start=false"], "--compressors"),
    (["--compressors", "top_k:k=5,k=6"], "--compressors"),  # key twice
    (["--compressors", "top_k:k=5"], "--compressors"),  # and --ratio's ratio
    # Checked on the calibrated factory call (after the sample gradient).
    (["--compressors", "hard_threshold:capacity_ratio=2"], "--compressors"),
    (["--task", "imagenet"], "--task"),
    (["--task", "missing.py:task"], "--task"),  # no such file
    (["--task", "json:no_such_name"], "--task"),
    (["--task", "os:sep"], "--task"),  # not a Task
    (["--task", "json:dumps"], "--task"),  # a callable that needs arguments
    (["--task", "no_such_module_xyz:task"], "--task"),
    (["--ratio", "7"], "--ratio"),
    (["--steps", "0"], "--steps"),
    (["--out", "blocker/results"], "--out"),
    (["--checkpoint-dir", "blocker"], "--checkpoint-dir"),
    (["--feedback", "sometimes"], "--feedback"),
    (["--granularity", "tensor"], "--granularity"),
    (["--optimizer", "lion"], "--optimizer"),
    (["--lr", "-1"], "--lr"),
    (["--accumulate", "0"], "--accumulate"),
    (["--workers", "64"], "--workers"),
    (["--workers", "0"], "--workers"),
    (["--bandwidth-gbit", "0"], "--bandwidth-gbit"),
    (["--bandwidth-gbit", "fast"], "--bandwidth-gbit"),
    (["--target", "-0.5"], "--target"),
    (["--target", "nan"], "--target"),
    (["--target", "1.5"], "--target"),  # an accuracy, checked on the task
    (["--resume"], "--resume"),
    (["--resume", "--checkpoint-dir", "empty"], "--resume"),
    (["--diloco", "0"], "--diloco"),
    (["--diloco", "2.5"], "--diloco"),  # not an integer
    (["--diloco", "often"], "--diloco"),
    (["--diloco", "4", "--accumulate", "2"], "--accumulate"),
    (["--outer-momentum", "1.5"], "--outer-momentum"),
    (["--outer-lr", "0"], "--outer-lr"),
]


@pytest.mark.parametrize("argv, option", BAD_OPTIONS)
def test_bad_option_is_one_line_exit_2_and_writes_nothing(
    argv, option, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # the default --out is relative
  (tmp_path / "blocker").write_text("a file, not a directory")
  (tmp_path / "empty").mkdir()
  before = sorted(tmp_path.rglob("*"))
  assert gsparse("compare", *argv) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and option in lines[0], captured.err
  assert "Traceback" not in captured.err + captured.out
  assert sorted(tmp_path.rglob("*")) == before


def test_compressor_specs_parse_into_names_and_typed_options():
  from gsparse_jax._src.cli import specs  # pylint: disable=g-import-not-at-top

  known = gs.compressor_names()
  parse = lambda text: [(s.name, s.options, s.text)
                        for s in specs.parse_compressors(text, known)]
  assert parse("top_k,power_sgd:rank=4,hard_threshold:capacity_ratio=0.05"
               ) == [("top_k", {}, "top_k"),
                     ("power_sgd", {"rank": 4}, "power_sgd:rank=4"),
                     ("hard_threshold", {"capacity_ratio": 0.05},
                      "hard_threshold:capacity_ratio=0.05")]
  # An item with '=' continues the compressor before it.
  assert parse(" power_sgd:rank=2, warm_start=False ,min_compression_rate=1e1,"
               "top_k:ratio=none,k=7,method=sort") == [
                   ("power_sgd", {"rank": 2, "warm_start": False,
                                  "min_compression_rate": 10.0},
                    "power_sgd:rank=2,warm_start=false,"
                    "min_compression_rate=10.0"),
                   ("top_k", {"ratio": None, "k": 7, "method": "sort"},
                    "top_k:ratio=none,k=7,method=sort")]
  values = [specs.parse_value(t) for t in
            ("4", "-3", "0.5", "1e-3", "true", "FALSE", "None", "bfloat16")]
  assert values == [4, -3, 0.5, 0.001, True, False, None, "bfloat16"]
  assert [type(v) for v in values[:4]] == [int, int, float, float]
  for bad in ("nope", "k=3", "top_k:k", "top_k:=3", "top_k:k=", "top_k,top_k",
              "top_k:k=1,k=2", "top_k:k=1:method=sort", ""):
    with pytest.raises(ValueError):
      specs.parse_compressors(bad, known)


def test_options_reach_the_factory_with_recommended_feedback(tmp_path):
  """top_k:ratio=none,k=100 sends 100 (float32, int32) pairs; each
  compressor gets its registry row's feedback unless --feedback is given."""
  spec = "top_k:ratio=none,k=100"
  assert gsparse("compare", "--compressors", f"arc_top_k,{spec},dense",
                 "--steps", 4, "--out", tmp_path / "a", *TINY) == 0
  arc, top_k, dense = _results(tmp_path / "a")["runs"]
  assert top_k["compressor"] == spec
  assert top_k["bytes_per_step_per_worker"] == 100 * 8
  assert [run["feedback"] for run in (arc, top_k, dense)] == [
      "ef", "ef", "none"]
  assert gsparse("compare", "--compressors", f"{spec},dense", "--steps", 2,
                 "--feedback", "ef21", "--out", tmp_path / "b", *TINY) == 0
  assert [run["feedback"] for run in _results(tmp_path / "b")["runs"]] == [
      "ef21", "ef21"]


def test_registry_recommends_a_valid_feedback_per_compressor():
  expected = {"dense": "none"}
  for name, entry in gs.COMPRESSORS.items():
    assert entry.feedback == expected.get(name, "ef"), name
    gs.sparsify(gs.dense(), feedback=entry.feedback)  # a rule sparsify knows
    if name != "hard_threshold":  # arguments() needs its sample
      # from_ratio is the factory at arguments().
      assert entry.factory(**entry.arguments(0.05, None)) == (
          entry.from_ratio(0.05, None)), name


def _record_steps(monkeypatch) -> list:
  """Records the step of every batch drawn (the data position)."""
  steps = []
  batch = training.Run.batch

  def recorded(self, step):
    steps.append(step)
    return batch(self, step)

  monkeypatch.setattr(training.Run, "batch", recorded)
  return steps


# RegTop-k's state and EF21-SGDM's memories must survive the checkpoint.
RESUMED = ["--compressors", "reg_top_k", "--feedback", "ef21m", *TINY]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """results.json of one uninterrupted 80-step run, without wall times."""
  out = tmp_path_factory.mktemp("straight")
  assert gsparse("compare", *RESUMED, "--steps", 80, "--out", out) == 0
  return _without_wall_time(_results(out))


def test_resume_ends_bit_identical_to_an_uninterrupted_run(
    straight, tmp_path, monkeypatch):
  checkpoints = tmp_path / "checkpoints"
  options = [*RESUMED, "--checkpoint-every", 20, "--checkpoint-dir",
             checkpoints]
  steps = _record_steps(monkeypatch)
  assert gsparse("compare", *options, "--steps", 40, "--out",
                 tmp_path / "first") == 0
  assert steps == list(range(40))
  # Continuing needs --resume and the same options.
  assert gsparse("compare", *options, "--steps", 80, "--out",
                 tmp_path / "x") == 2
  assert gsparse("compare", *options, "--steps", 80, "--lr", 0.01,
                 "--resume", "--out", tmp_path / "x") == 2
  assert not (tmp_path / "x").exists()
  steps.clear()
  assert gsparse("compare", *options, "--steps", 80, "--resume", "--out",
                 tmp_path / "resumed") == 0
  assert steps == list(range(40, 80))  # from the checkpoint's position
  assert _without_wall_time(_results(tmp_path / "resumed")) == straight


def _finished_checkpoints(directory: pathlib.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_resume_after_the_process_is_killed(tmp_path):
  """SIGKILL a long run once it has checkpointed and resume it 10 steps
  further: the same results as one run of as many steps."""
  checkpoints = tmp_path / "checkpoints"
  options = [*RESUMED, "--checkpoint-every", 10]
  process = subprocess.Popen(
      [sys.executable, "-m", "gsparse_jax", "compare", *map(str, options),
       "--steps", "100000", "--checkpoint-dir", str(checkpoints), "--out",
       str(tmp_path / "killed")],
      cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  try:
    deadline = time.monotonic() + 300  # a guard against a hung child only
    while not _finished_checkpoints(checkpoints / "reg_top_k" / "seed-0"):
      assert process.poll() is None, process.stderr.read()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint was written"
      time.sleep(0.05)
  finally:
    process.send_signal(signal.SIGKILL)
    process.communicate()
  assert process.returncode == -signal.SIGKILL
  steps = max(_finished_checkpoints(checkpoints / "reg_top_k" / "seed-0")
              ) + 10
  assert gsparse("compare", *options, "--steps", steps, "--checkpoint-dir",
                 checkpoints, "--resume", "--out", tmp_path / "resumed") == 0
  assert gsparse("compare", *options, "--steps", steps, "--out",
                 tmp_path / "straight") == 0
  assert (_without_wall_time(_results(tmp_path / "resumed"))
          == _without_wall_time(_results(tmp_path / "straight")))


def test_seeds_report_mean_and_std_of_their_runs(tmp_path, capsys):
  """--seeds 3 --seed 5: seeds 5, 6, 7 (other init and batches); the mean
  and the sample std recomputed from the per-seed figures of the JSON."""
  assert gsparse("compare", "--compressors", "dense,top_k", "--steps", 8,
                 "--seeds", 3, "--seed", 5, "--simulate", "--out", tmp_path,
                 *TINY) == 0
  table = capsys.readouterr().out
  results = _results(tmp_path)
  assert results["config"]["seeds"] == 3
  for run in results["runs"]:
    assert run["seeds"] == [5, 6, 7]
    assert [r["seed"] for r in run["per_seed"]] == [5, 6, 7]
    for key in ("final_accuracy", "final_loss"):
      values = np.array([r[key] for r in run["per_seed"]])
      if key == "final_loss":  # (accuracies over 397 examples may tie)
        assert len(set(values.tolist())) == 3  # the seeds differ
      np.testing.assert_allclose(run[key], values.mean(), rtol=1e-12)
      np.testing.assert_allclose(run[f"{key}_std"], values.std(ddof=1),
                                 rtol=1e-12)
      assert f"{run[key]:.4f} +- {run[key + '_std']:.4f}" in table
    losses = np.array([r["curves"]["loss"] for r in run["per_seed"]])
    np.testing.assert_allclose(run["curves"]["loss"], losses.mean(0))
  # One seed: the run's own figures, no spread.
  (one,) = _results_of("--compressors", "top_k", "--steps", 8, "--seed", 6,
                       "--simulate", "--out", tmp_path / "one", *TINY)["runs"]
  assert one["final_accuracy_std"] is None and one["seeds"] == [6]
  assert one["final_accuracy"] == results["runs"][1]["per_seed"][1][
      "final_accuracy"]


def _results_of(*argv) -> dict:
  out = argv[list(argv).index("--out") + 1]
  assert gsparse("compare", *argv) == 0
  return _results(out)


def test_resume_continues_every_seed(tmp_path):
  options = ["--compressors", "top_k", "--seeds", 2, "--checkpoint-every", 8,
             "--checkpoint-dir", tmp_path / "checkpoints", *TINY]
  assert gsparse("compare", *options, "--steps", 8, "--out",
                 tmp_path / "first") == 0
  for seed in (0, 1):
    assert _finished_checkpoints(tmp_path / "checkpoints" / "top_k"
                                 / f"seed-{seed}") == [8]
  resumed = _results_of(*options, "--steps", 16, "--resume", "--out",
                        tmp_path / "resumed")
  straight = _results_of("--compressors", "top_k", "--seeds", 2, *TINY,
                         "--steps", 16, "--out", tmp_path / "straight")
  assert _without_wall_time(resumed)["runs"] == _without_wall_time(
      straight)["runs"]


USER_TASK = """
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
import gsparse_jax as gs

rng = np.random.default_rng(0)
x = rng.normal(size=(300, 6)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int32)

def loss(model, xb, yb):
  return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

def make():
  return gs.Task(
      name="mine", summary="logistic regression on my arrays",
      metric="accuracy",
      make_model=lambda seed: nnx.Linear(6, 2, rngs=nnx.Rngs(seed)),
      loss=loss,
      evaluate=lambda m: (loss(m, x, y), jnp.mean(m(x).argmax(-1) == y)),
      sample=lambda r, shape: (lambda i: (x[i], y[i]))(
          r.integers(0, 300, shape)))
"""


def test_user_task_from_a_file_and_a_module(tmp_path, monkeypatch):
  (tmp_path / "user_task.py").write_text(USER_TASK)
  monkeypatch.chdir(tmp_path)
  for spec in ("user_task.py:make", "user_task:make"):  # file, then module
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / spec.replace(":", "_")
    results = _results_of("--task", spec, "--compressors", "dense,top_k",
                          "--steps", 4, "--out", out, *TINY)
    assert results["config"]["task"] == spec
    assert results["config"]["num_params"] == 6 * 2 + 2
    dense, top_k = results["runs"]
    assert dense["bytes_per_step_per_worker"] == 14 * 4
    assert top_k["bytes_per_step_per_worker"] == 1 * 8  # max(1, 0.14)


def test_the_readme_task_file_runs_as_written(tmp_path, monkeypatch):
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md")
  (code,) = [b for b in readme.read_text().split("```py\n")[1:]
             if "gs.Task(" in b]
  (tmp_path / "my_task.py").write_text(code.split("```")[0])
  monkeypatch.chdir(tmp_path)
  results = _results_of("--task", "my_task.py:task", "--compressors",
                        "dense,cast", "--steps", 4, "--out", tmp_path / "out",
                        *TINY)
  assert results["config"]["num_params"] == 20 * 64 + 64 + 64 * 2 + 2
  assert [r["feedback"] for r in results["runs"]] == ["none", "ef"]


def test_info_lists_versions_devices_and_every_compressor(capsys):
  import jax  # pylint: disable=g-import-not-at-top
  assert gsparse("info") == 0
  out = capsys.readouterr().out
  assert jax.__version__ in out and "optax" in out and "flax" in out
  assert f"devices: {jax.device_count()} x cpu" in out
  for name in gs.compressor_names():
    assert name in out
  # Factory defaults, as written in their signatures.
  assert "method='auto'" in out and "recall_target=0.95" in out


def test_bench_outside_a_checkout_is_one_line_exit_2(tmp_path, monkeypatch,
                                                     capsys):
  monkeypatch.setattr(bench, "checkout_root", lambda: tmp_path)
  assert gsparse("bench", "--out", tmp_path / "out") == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
  assert not (tmp_path / "out").exists()


def test_bench_runs_the_suite_quick_and_writes_its_report(tmp_path,
                                                          monkeypatch):
  """The command's plumbing (the benchmarks themselves have smoke tests):
  quick mode by default, into --out, tables in report.md."""
  calls = []
  report = types.SimpleNamespace(
      run_all=lambda out, quick: calls.append((out, quick)),
      render=lambda out: f"TABLES OF {out}")
  monkeypatch.setattr(bench.importlib, "import_module",
                      lambda name: report if name == "benchmarks.report"
                      else pytest.fail(name))
  out = tmp_path / "bench"
  assert gsparse("bench", "--out", out) == 0
  assert gsparse("bench", "--out", out, "--full") == 0
  assert calls == [(str(out), True), (str(out), False)]
  assert (out / "report.md").read_text() == f"TABLES OF {out}\n"


@pytest.mark.slow
def test_bench_quick_end_to_end(tmp_path):
  assert gsparse("bench", "--out", tmp_path) == 0
  for name in ("selection", "step_overhead", "bytes", "scale_model"):
    assert (tmp_path / f"{name}.png").stat().st_size > 0
  assert "### Bytes per step" in (tmp_path / "report.md").read_text()


MISSING = [  # (argv, module made unimportable, the distribution named)
    (["compare"], "sklearn", "scikit-learn"),
    (["compare", "--task", "charlm"], "flax", "flax"),
    (["compare", "--checkpoint-dir", "ckpt"], "orbax.checkpoint",
     "orbax-checkpoint"),
    (["bench"], "matplotlib", "matplotlib"),
]


@pytest.mark.parametrize("argv, module, package", MISSING)
def test_missing_module_of_the_extra_is_one_line_exit_2(
    argv, module, package, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(sys.modules, module, None)  # `import module` fails
  assert gsparse(*argv) == 2
  captured = capsys.readouterr()
  assert captured.err == (f"gsparse: {argv[0]} needs {package}; install "
                          "gsparse_jax[cli] (pip install "
                          "'gsparse_jax[cli]')\n")
  assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_an_unlisted_import_of_the_extra_is_still_one_line(monkeypatch,
                                                          capsys):
  """`requires` missed it, the import fails in `run`: the same line."""
  from gsparse_jax._src.cli import advise  # pylint: disable=g-import-not-at-top

  def run(args):
    del args
    import rich.table  # pylint: disable=g-import-not-at-top,unused-import
    return 0

  monkeypatch.setattr(advise, "run", run)
  monkeypatch.setitem(sys.modules, "rich.table", None)
  assert gsparse("advise", "--params", 1e6, "--workers", 8,
                 "--bandwidth-gbit", 10) == 2
  assert capsys.readouterr().err.startswith("gsparse: advise needs rich; ")


@pytest.mark.parametrize("module", ["rich", "flax", "sklearn", "matplotlib",
                                    "orbax"])
def test_info_needs_only_the_core_dependencies(module, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, module, None)
  assert gsparse("info") == 0
  assert "top_k" in capsys.readouterr().out


def test_the_cli_extra_holds_every_module_a_subcommand_may_need():
  import tomllib  # pylint: disable=g-import-not-at-top

  from gsparse_jax._src.cli import common  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(__file__).resolve().parents[1]
  extras = tomllib.loads((root / "pyproject.toml").read_text())[
      "project"]["optional-dependencies"]
  names = lambda extra: {r.split(">")[0].split("=")[0].split("[")[0]
                         for r in extras[extra]}
  assert names("cli") == set(common.EXTRA_MODULES.values())
  assert names("cli") <= names("examples")  # the quick start has them all
  for command in cli.COMMANDS:
    args = cli.build_parser().parse_args(
        [command.NAME, *(["--params", "1", "--workers", "1",
                          "--bandwidth-gbit", "1"]
                         if command.NAME == "advise" else [])])
    for module in command.requires(args):
      assert module.partition(".")[0] in common.EXTRA_MODULES


def test_warmup_and_kept_dense_leaves_reach_sparsify_and_the_time(tmp_path):
  out = tmp_path / "warm"
  assert gsparse("compare", "--compressors", "top_k", "--steps", 16,
                 "--warmup-steps", 8, "--keep-dense", 200, "--simulate",
                 "--out", out, *TINY) == 0
  (run,) = _results(out)["runs"]
  assert (run["warmup_steps"], run["keep_dense_min_size"]) == (8, 200)
  # The three kernels (25,856 values) compressed: Top-259; the biases
  # (266 values, rank 1) dense; the 8 warm-up steps all dense.
  kernels, biases = 64 * 128 + 128 * 128 + 128 * 10, 128 + 128 + 10
  compressed = biases * 4 + round(0.01 * kernels) * 8
  assert run["bytes_per_step_per_worker"] == (8 * MLP_PARAMS * 4
                                              + 8 * compressed) / 16
  network = gs.cost_model.network_from_gbit(1.0)
  price = lambda c, d: gs.cost_model.project_compressor(
      c, d, 8, network).communication_s
  expected = (8 * price(gs.dense(), MLP_PARAMS) + 8 * (
      price(gs.top_k(0.01), kernels) + price(gs.dense(), biases))) / 16
  assert run["projected_comm_s"] == pytest.approx(expected, rel=1e-12)
  for bad in (["--warmup-steps", -1], ["--keep-dense", "x"],
              ["--keep-dense", 10, "--diloco", 2]):
    assert gsparse("compare", "--compressors", "top_k", "--out",
                   tmp_path / "bad", *bad) == 2
  assert not (tmp_path / "bad").exists()
