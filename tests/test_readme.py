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


def test_readme_example_runs_as_written(tmp_path):
  (code,) = _blocks("python")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "JAX_NUM_CPU_DEVICES": "8"})
  assert result.returncode == 0, result.stderr[-3000:]
  # dense bytes / sent bytes for top_k(0.01) of 64 floats: k = 1, 256 / 8.
  assert float(result.stdout.strip().splitlines()[-1]) == 32.0


def test_ci_runs_the_readme_test_command():
  main_job, tests = _blocks("bash")
  ci = (ROOT / ".ci" / "run").read_text()
  assert tests.strip() in ci.splitlines()
  # The main job installs as the tests do, then runs the `gsparse` command.
  install = tests.split(" && .venv/bin/python -m pytest")[0]
  assert main_job.strip() == f"{install} && .venv/bin/gsparse compare"
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert pyproject["project"]["scripts"]["gsparse"] == "gsparse_jax.cli:main"
