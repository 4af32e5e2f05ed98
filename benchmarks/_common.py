"""Shared helpers of the benchmarks: timing, machine description, output.

Timings are medians of repeats of a warmed-up call that blocks until the
result is ready. On shared machines (2 cores, other jobs running) single
timings are noisy: compare quantities measured in the same run, ideally
interleaved (`time_interleaved`), and report ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np


def time_samples(fn: Callable[[], Any], *, repeats: int = 7,
                 warmup: int = 1) -> List[float]:
  """Wall-clock seconds of `repeats` calls of `fn`, after `warmup` calls.

  Args:
    fn: zero-argument callable; its result is waited for with
      `jax.block_until_ready`, so asynchronous dispatch is timed fully.
    repeats: number of timed calls.
    warmup: untimed calls first (compilation, first-touch of buffers).

  Returns:
    The list of timings in seconds.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    samples.append(time.perf_counter() - start)
  return samples


def time_fn(fn: Callable[[], Any], *, repeats: int = 7,
            warmup: int = 1) -> float:
  """Median wall-clock seconds of `fn()` (see `time_samples`)."""
  return statistics.median(time_samples(fn, repeats=repeats, warmup=warmup))


def time_interleaved(fns: Dict[str, Callable[[], Any]], *, repeats: int = 7,
                     warmup: int = 1) -> Dict[str, float]:
  """Median seconds of several callables timed round-robin.

  Interleaving spreads the load of other jobs evenly over the candidates,
  so their ratios are more stable than when each is timed in a block.

  Args:
    fns: name -> zero-argument callable.
    repeats: timed rounds.
    warmup: untimed rounds first.

  Returns:
    name -> median seconds.
  """
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in samples.items()}


def minor_faults(fn: Callable[[], Any], *, calls: int = 3) -> Optional[int]:
  """Median minor page faults of the process during one call of ``fn``
  (already compiled and warm); None where `resource` is unavailable.

  Each fault is a fresh page touched: a buffer that the allocator maps
  anew for every call (glibc does so above its mmap ceiling) costs one
  fault per 4 KiB page it uses.
  """
  try:
    import resource  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  counts = []
  for _ in range(calls):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(fn())
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return int(statistics.median(counts))


def allocator() -> str:
  """The malloc this process runs on: a preloaded tcmalloc/jemalloc/
  mimalloc (``LD_PRELOAD``), else the C library's."""
  for library in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
    name = os.path.basename(library)
    for known in ("tcmalloc", "jemalloc", "mimalloc"):
      if known in name:
        return f"{known} ({name})"
  libc, version = platform.libc_ver()
  return f"{libc or 'libc'} {version} malloc".strip()


def machine_description() -> Dict[str, Any]:
  """What the numbers were measured on, for the JSON output."""
  description = {
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "numpy": np.__version__,
      "cpu_count": os.cpu_count(),
      "cpu_model": _cpu_model(),
      "memory_gib": _memory_gib(),
      "devices": [str(d) for d in jax.devices()][:4],
      "device_count": jax.device_count(),
      "backend": jax.default_backend(),
      "allocator": allocator(),
  }
  try:
    description["load_average"] = list(os.getloadavg())
  except OSError:
    pass
  return description


def write_json(out_dir: str, name: str, result: Dict[str, Any]) -> str:
  """Writes `result` to `out_dir/name.json` (creating `out_dir`).

  Returns:
    The path written.
  """
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=_to_json)
  return path


def write_plot(out_dir: str, name: str, plot: Callable[[Any], None], *,
               nrows: int = 1, ncols: int = 1,
               figsize: Optional[tuple] = None, title: str = "") -> str:
  """Draws `plot(axes)` with matplotlib's Agg backend to `out_dir/name.png`.

  Args:
    out_dir: output directory (created if missing).
    name: file name without extension.
    plot: called with one `Axes` (1x1 grid) or a 2-D array of them.
    nrows: rows of the grid of axes.
    ncols: columns of the grid of axes.
    figsize: inches; defaults to 6.4 x 4.8 per axes, capped.
    title: figure title.

  Returns:
    The path written.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  os.makedirs(out_dir, exist_ok=True)
  if figsize is None:
    figsize = (min(5.0 * ncols, 20.0), min(4.0 * nrows, 16.0))
  fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
  plot(axes[0, 0] if nrows == ncols == 1 else axes)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _to_json(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _memory_gib() -> Optional[float]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None
