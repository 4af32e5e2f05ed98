"""The README's example and quick start stay true."""

import os
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(language):
  text = (ROOT / "README.md").read_text()
  return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _run(code, cwd):
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "JAX_NUM_CPU_DEVICES": "8"})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()


def test_readme_example_runs_as_written(tmp_path):
  code = _blocks("python")[0]
  # dense bytes / sent bytes for top_k(0.01) of 64 floats: k = 1, 256 / 8.
  assert float(_run(code, tmp_path)[-1]) == 32.0


def test_readme_diloco_runs_as_written(tmp_path):
  (code,) = [b for b in _blocks("python") if "gs.diloco" in b]
  counts, spread = _run(code, tmp_path)[-2:]
  syncs, sent, dense = (float(w) for w in counts.split())
  # 100 steps, a sync every 10. Top-1% of 1000: k = 10 int32 indices, one
  # word of 2-bit codes and one float32 scale: 48 B a sync.
  assert (syncs, sent, dense) == (10, 10 * 48, 10 * 1000 * 4)
  assert float(spread) < 1e-5


def test_readme_meshes_with_several_axes_run_as_written(tmp_path):
  (code,) = [b for b in _blocks("python") if "inner_axes" in b]
  tensor_parallel, two_level = _run(code, tmp_path)[-2:]
  # ("data", "model"): per device, the bias alone (k = 1 of 4) and the
  # weight shards together (16*4 + 4*4 = 80 values, k = 8), 8 bytes a pair.
  numbers = lambda line: [float(w) for w in line.split() if w[0].isdigit()]
  assert numbers(tensor_parallel) == [(1 + 8) * 8, 0.0]
  # ("slice", "data"): one budget over all 4 + 128 + 32 = 164 values
  # (k = 16) across slices; the dense gradient (164 float32) inside.
  assert numbers(two_level) == [16 * 8, 164 * 4]


def test_ci_runs_the_readme_test_command():
  main_job, tests = _blocks("bash")
  ci = (ROOT / ".ci" / "run").read_text()
  assert tests.strip() in ci.splitlines()
  # The main job installs as the tests do, then runs the `gsparse` command.
  install = tests.split(" && .venv/bin/python -m pytest")[0]
  assert main_job.strip() == f"{install} && .venv/bin/gsparse compare"
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert pyproject["project"]["scripts"]["gsparse"] == "gsparse_jax.cli:main"


def test_readme_jit_and_nnx_loops_run_as_written(tmp_path):
  (jit_loop,) = [b for b in _blocks("python") if "gs.data_parallel(" in b]
  (nnx_loop,) = [b for b in _blocks("python") if "gs.nnx_data_parallel(" in b]
  # One interpreter for both (each block is self-contained).
  lines = _run(jit_loop + "\n" + nnx_loop, tmp_path)
  # top_k(0.01) of 64 values: k = 1, 256 dense bytes / 8 sent, 8 workers.
  assert lines[0] == "8 32.0"
  assert lines[1] == "8 ['accuracy', 'loss']"
  assert lines[2] == "P('data',)"


def test_readme_warmup_and_keep_dense_run_as_written(tmp_path):
  (code,) = [b for b in _blocks("python") if "keep_dense=" in b]
  plan, counts = _run(code, tmp_path)[-2:]
  assert plan == "SegmentPlan(2 leaves, global: [16 dense, 1024])"
  sent, dense = (float(w) for w in counts.split())
  # 3 steps of 1040 float32 values: 2 warm-up steps dense, then the bias
  # (16 values) dense and Top-1% of the kernel: k = 10 (value + index).
  assert dense == 3 * 1040 * 4
  assert sent == 2 * 1040 * 4 + (16 * 4 + 10 * 8)
