"""The built wheel in a fresh venv that has the core dependencies only.

Builds the wheel from a copy of the package, installs it (no dependencies)
into a new venv without site packages, and makes the core dependencies --
the wheel's own ``Requires-Dist`` without extras, closed over their
requirements -- importable there from this interpreter's installation (links,
nothing downloaded but the build backend). Then `gsparse info` must work,
and `gsparse compare` must name the ``cli`` extra in one line.
"""

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Without this checkout on the path: only what is installed counts.
ENV = {k: v for k, v in os.environ.items()
       if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(*argv, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run([str(a) for a in argv], capture_output=True,
                        text=True, timeout=240, env=ENV, cwd=cwd)


def _core_requirements(wheel: pathlib.Path) -> list[Requirement]:
  """The wheel's ``Requires-Dist`` entries that need no extra."""
  with zipfile.ZipFile(wheel) as archive:
    (name,) = [n for n in archive.namelist()
               if n.endswith(".dist-info/METADATA")]
    metadata = archive.read(name).decode()
  requirements = [Requirement(line.split(":", 1)[1].strip())
                  for line in metadata.splitlines()
                  if line.startswith("Requires-Dist:")]
  return [r for r in requirements
          if r.marker is None or r.marker.evaluate({"extra": ""})]


def _closure(requirements) -> set[str]:
  """The installed distributions ``requirements`` need, transitively."""
  seen, todo = set(), list(requirements)
  while todo:
    requirement = todo.pop()
    name = canonicalize_name(requirement.name)
    if name in seen:
      continue
    seen.add(name)
    for line in importlib.metadata.requires(requirement.name) or ():
      nested = Requirement(line)
      if nested.marker is None or nested.marker.evaluate({"extra": ""}):
        todo.append(nested)
  return seen


def _link_distributions(names, into: pathlib.Path) -> None:
  """Links every top-level file and package of the distributions ``names``
  (their .dist-info too, for `importlib.metadata`) into ``into``."""
  into.mkdir()
  for name in names:
    dist = importlib.metadata.distribution(name)
    tops = {pathlib.PurePath(f).parts[0] for f in dist.files or ()
            if ".." not in pathlib.PurePath(f).parts}
    for top in tops:
      source = pathlib.Path(dist.locate_file(top))
      if source.exists() and not (into / top).exists():
        (into / top).symlink_to(source)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> pathlib.Path:
  """A venv holding the wheel and the core dependencies, nothing else."""
  work = tmp_path_factory.mktemp("install")
  source = work / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source)
  shutil.copytree(ROOT / "gsparse_jax", source / "gsparse_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  built = _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
               "-w", work / "wheels", source)
  assert built.returncode == 0, built.stderr[-3000:]
  (wheel,) = (work / "wheels").glob("gsparse_jax-*.whl")

  venv = work / "venv"
  made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
  assert made.returncode == 0, made.stderr
  python = venv / "bin" / "python"
  installed = _run(sys.executable, "-m", "pip", "--python", python,
                   "install", "-q", "--no-deps", "--no-index", wheel)
  assert installed.returncode == 0, installed.stderr[-3000:]
  site = _run(python, "-c",
              "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  core = work / "core"
  _link_distributions(_closure(_core_requirements(wheel)), core)
  pathlib.Path(site.stdout.strip(), "core_dependencies.pth").write_text(
      f"{core}\n")
  return venv


def _gsparse(venv, *argv) -> subprocess.CompletedProcess:
  return _run(venv / "bin" / "gsparse", *argv, cwd=venv)


def test_the_venv_lacks_every_module_of_the_cli_extra(core_venv):
  probe = _run(core_venv / "bin" / "python", "-c",
               "import importlib.util as u; import gsparse_jax._src.cli."
               "common as c; print([m for m in c.EXTRA_MODULES "
               "if u.find_spec(m)]); print(c.__file__)", cwd=core_venv)
  assert probe.returncode == 0, probe.stderr
  found, location = probe.stdout.split()
  assert found == "[]"
  assert location.startswith(str(core_venv))  # the wheel, not this checkout


def test_info_runs_on_the_core_dependencies(core_venv):
  info = _gsparse(core_venv, "info")
  assert info.returncode == 0, info.stderr[-3000:]
  assert "jax " in info.stdout and "top_k" in info.stdout
  assert "flax              not installed" in info.stdout


def test_compare_without_the_extra_is_one_line_naming_it(core_venv):
  compare = _gsparse(core_venv, "compare")
  assert compare.returncode == 2
  assert compare.stdout == ""
  assert compare.stderr == ("gsparse: compare needs flax; install "
                            "gsparse_jax[cli] (pip install "
                            "'gsparse_jax[cli]')\n")
