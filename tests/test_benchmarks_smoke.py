"""Smoke tests: every benchmark runs with --quick.

Each runs as `python -m benchmarks.NAME --out DIR --quick` from the
repository root, and must write a valid JSON with the expected keys and a
PNG.
"""

import importlib
import json
import mmap
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import gsparse_jax as gs

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
  """One directory all the quick benchmarks write into (for the report)."""
  return tmp_path_factory.mktemp("benchmarks")


def run_benchmark(name: str, out_dir: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  completed = subprocess.run(
      [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out_dir),
       "--quick"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert (out_dir / f"{name}.png").stat().st_size > 0
  with open(out_dir / f"{name}.json") as f:
    return json.load(f)


def test_selection_benchmark(results_dir):
  result = run_benchmark("selection", results_dir)
  assert {"machine", "config", "results"} <= set(result)
  assert result["results"]
  methods = {"threshold", "sort", "auto", "lax.top_k", "lax.approx_max_k",
             "jnp.argsort"}
  for row in result["results"]:
    assert {"size", "ratio", "k", "floors", "methods"} <= set(row)
    assert {"read_s", "read_write_s"} <= set(row["floors"])
    assert methods <= set(row["methods"]) | set(row.get("skipped", {}))
    for name, timing in row["methods"].items():
      assert timing["seconds"] > 0
      assert {"ratio_to_read", "ratio_to_read_write", "recall"} <= set(timing)
      if name in ("threshold", "sort", "auto", "lax.top_k"):
        assert timing["same_set_as_threshold"], name


def test_scale_model_benchmark(results_dir):
  result = run_benchmark("scale_model", results_dir)
  assert {"machine", "selection", "model", "grid", "points", "wins"} <= set(
      result)
  assert result["selection"]["seconds_per_element"] > 0
  grid = result["grid"]
  assert min(grid["workers"]) == 8 and max(grid["workers"]) == 4096
  assert min(grid["params"]) == 1e6 and max(grid["params"]) == 1e10
  expected_points = (len(grid["workers"]) * len(grid["params"])
                     * len(grid["gbit_per_s"]))
  assert len(result["points"]) == expected_points
  for point in result["points"][:5]:
    assert point["best"] in ("dense", "sparse", "aligned", "arc")
    assert point["best_speedup_over_dense"] >= 1.0 - 1e-12
    assert set(point["layouts"]) == {"dense", "sparse", "aligned", "arc"}


@pytest.mark.parametrize("name", ["selection", "scale_model", "bytes",
                                  "step_overhead", "report"])
def test_benchmarks_are_importable_modules(name, capsys):
  """Each imports in-process and its CLI takes the options `report` uses."""
  sys.path.insert(0, str(REPO_ROOT))
  try:
    module = importlib.import_module(f"benchmarks.{name}")
  finally:
    sys.path.remove(str(REPO_ROOT))
  assert pathlib.Path(module.__file__).parent == REPO_ROOT / "benchmarks"
  with pytest.raises(SystemExit) as exit_info:
    module.main(["--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  assert "--out" in usage and "--quick" in usage


def test_bytes_benchmark(results_dir):
  result = run_benchmark("bytes", results_dir)
  rows = result["results"]
  assert list(rows) == list(gs.compressor_names())  # the whole registry
  k = round(result["ratio"] * result["size"])
  for n in ("2", "8"):
    # Hand-computed payloads: value + int32 index for Top-k, values only
    # for shared Rand-k, the whole float32 vector for dense.
    assert rows["top_k"][n]["payload_bytes"] == k * 8
    assert rows["rand_k"][n]["payload_bytes"] == k * 4  # shared indices
    assert rows["dense"][n]["payload_bytes"] == result["size"] * 4
  # The all-gather's traffic grows with workers; ARC's all-reduce does not.
  assert rows["top_k"]["8"]["traffic_bytes"] == 7 * k * 8
  assert rows["top_k"]["2"]["traffic_bytes"] == k * 8
  assert rows["arc_top_k"]["8"]["payload_bytes"] == rows["arc_top_k"]["2"][
      "payload_bytes"]
  assert (rows["arc_top_k"]["8"]["traffic_bytes"]
          < 2 * rows["arc_top_k"]["8"]["payload_bytes"])


def test_step_overhead_benchmark(results_dir):
  result = run_benchmark("step_overhead", results_dir)
  steps = result["shard_map"]["steps"]
  assert {"sgd (dense all-reduce)", "top_k", "dense"} <= set(steps)
  assert steps["sgd (dense all-reduce)"]["ratio_to_sgd"] == 1.0
  for size_rows in result["single_device"].values():
    assert size_rows["sgd"]["ratio_to_sgd"] == 1.0
    assert all(row["seconds"] > 0 for row in size_rows.values())
    update = size_rows["sparsify(top_k(0.01)) update"]
    assert update["ratio_to_read_write"] == pytest.approx(
        update["seconds"] / update["read_write_s"])


def test_report_rebuilds_readme_tables_from_json(results_dir, tmp_path):
  """Runs after the four benchmarks above have written their JSON."""
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- report:begin -->\nSTALE-TABLE\n<!-- report:end -->"
                    "\noutro\n")
  completed = subprocess.run(
      [sys.executable, "-m", "benchmarks.report", "--out", str(results_dir),
       "--from-json", "--readme", str(readme)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith("outro\n")
  assert "STALE-TABLE" not in text
  for title in ("### Selection", "### Step overhead", "### Bytes per step",
                "### Scale model"):
    assert title in text
  bytes_result = json.loads((results_dir / "bytes.json").read_text())
  top_k = bytes_result["results"]["top_k"]["8"]
  assert f"| top_k | sparse | {top_k['payload_bytes']:.0f} |" in text


def run_step_overhead_model(out_dir: pathlib.Path, *options: str) -> str:
  """Runs `step_overhead` with `options` and the output name's prefix."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  completed = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_overhead", "--out",
       str(out_dir), "--quick", "--repeats", "1", *options],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  return completed.stdout


def test_step_overhead_transformer_pytree(tmp_path):
  """A tiny transformer-shaped pytree (57 leaves): every variant timed
  against sgd, adam and the floor of its own group; no timing asserted."""
  run_step_overhead_model(tmp_path, "--model", "transformer", "--scale",
                          "0.001", "--compressors", "top_k")
  name = "step_overhead_transformer_x0.001"
  assert (tmp_path / f"{name}.png").stat().st_size > 0
  result = json.loads((tmp_path / f"{name}.json").read_text())
  assert result["model"]["leaves"] == 57
  assert result["model"]["parameters"] > 0
  assert set(result["groups"]) == {"top_k"}
  variants = {f"{g}/{n}" for g in ("global", "layer")
              for n in ("skip", "ignore")}
  for group in result["groups"].values():
    assert set(group["baselines"]) == {"sgd", "adam", "floor"}
    assert all(0 < t < float("inf") for t in group["baselines"].values())
    assert set(group["variants"]) == variants
    for row in group["variants"].values():
      assert "error" not in row, row
      for base in ("sgd", "adam", "floor"):
        ratio = row[f"ratio_to_{base}"]
        assert 0 < ratio < float("inf")
        assert ratio == pytest.approx(row["seconds"]
                                      / group["baselines"][base])
      assert isinstance(row["temp_bytes"], int) and row["temp_bytes"] >= 0
      assert row["minor_faults_per_step"] >= 0
  assert "malloc" in result["machine"]["allocator"] or (
      "LD_PRELOAD" in os.environ)


def test_transformer_shapes_match_the_issue():
  """The default pytree is the one of issue 17: 29.4M parameters, 57
  leaves; --scale 4 is 4x the parameters in the same leaves."""
  sys.path.insert(0, str(REPO_ROOT))
  try:
    module = importlib.import_module("benchmarks.step_overhead")
  finally:
    sys.path.remove(str(REPO_ROOT))
  is_shape = lambda x: isinstance(x, tuple)
  count = lambda shapes: sum(
      int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=is_shape))
  base = module.transformer_shapes(1)
  assert len(jax.tree.leaves(base, is_leaf=is_shape)) == 57
  assert base["embedding"] == (8192, 512)
  assert base["block0"]["qkv"] == (512, 1536)
  assert base["block0"]["down"] == (2048, 512)
  assert count(base) == 29_372_416
  big = module.transformer_shapes(4)
  assert len(jax.tree.leaves(big, is_leaf=is_shape)) == 57
  assert count(big) / count(base) == pytest.approx(4.0, rel=0.01)


def test_step_overhead_charlm_step(tmp_path):
  """The charlm task's whole step: plain adam, dense and top_k in front,
  and the forward+backward alone; shares of the step in [0, 1) or below."""
  run_step_overhead_model(tmp_path, "--model", "charlm", "--batch", "2")
  assert (tmp_path / "step_overhead_charlm.png").stat().st_size > 0
  result = json.loads((tmp_path / "step_overhead_charlm.json").read_text())
  steps = result["steps"]
  assert set(steps) == {"forward+backward", "adam",
                        "sparsify(dense()) + adam",
                        "sparsify(top_k(0.01)) + adam"}
  assert steps["adam"]["ratio_to_adam"] == 1.0
  for name, row in steps.items():
    assert 0 < row["seconds"] < float("inf")
    if name.startswith("sparsify"):
      assert row["overhead_share"] == pytest.approx(
          1 - 1 / row["ratio_to_adam"])
      assert row["overhead_share"] < 1


def _benchmarks_common():
  sys.path.insert(0, str(REPO_ROOT))
  try:
    return importlib.import_module("benchmarks._common")
  finally:
    sys.path.remove(str(REPO_ROOT))


def test_allocator_names_a_preloaded_malloc(monkeypatch):
  common = _benchmarks_common()
  monkeypatch.setenv("LD_PRELOAD",
                     "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
  assert common.allocator() == "tcmalloc (libtcmalloc_minimal.so.4)"
  monkeypatch.setenv("LD_PRELOAD", "")
  assert common.allocator().endswith("malloc")


def test_minor_faults_count_a_freshly_mapped_buffer():
  """A fresh anonymous 64 MiB mapping written page by page faults once per
  page it touches, whatever the malloc; a call that allocates nothing
  faults (almost) never."""
  common = _benchmarks_common()
  size = 64 * 2**20
  pages = size // mmap.PAGESIZE

  def touch_fresh_mapping():
    buffer = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
      buffer[offset] = 1
    buffer.close()

  fresh = common.minor_faults(touch_fresh_mapping)
  assert 0.9 * pages <= fresh <= 1.5 * pages
  assert common.minor_faults(lambda: 1.0) < 0.01 * pages
