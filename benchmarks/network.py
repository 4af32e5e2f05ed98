"""Measured step time on a real, bandwidth-limited network, and the cost model.

Starts P processes (2 and 4, one CPU device each) that join with
`jax.distributed.initialize` on 127.0.0.1, inside a network namespace of
their own whose loopback is shaped with ``tc`` (token bucket: 10, 1 and 0.1
Gbit/s, and unshaped). JAX's CPU collectives (gloo) then run over TCP
through that one queue: a shared link, every worker's bytes crossing it.

For an MLP of about 1e6 and 2.5e7 parameters (batch 8 per worker, so that
communication dominates at low rates) it times the jitted `shard_map` step
`gs.local_value_and_grad` + `gs.sparsify(c, feedback="ef")` + SGD for
`dense()`, `top_k(0.01)`, `rand_k(0.01)` (shared indices), `arc_top_k(0.01)`
and `hard_threshold` calibrated to 1% on a first gradient (capacity 2%);
the same step on one worker alone (compute + selection, no network); and
the compute-only step (forward, backward, SGD).

`sparsify` runs with its default ``granularity="global"`` (one budget over
all leaves); ``--granularity layer`` gives each leaf its own budget. Since
issue 17 the global step no longer joins the raw gradient into one vector,
and at 4 processes, 1 Gbit/s and 2.5e7 parameters Top-k measured 823 ms
global against 862 ms layer (before it: 4,552 ms against 227 ms for the
one-worker step). Every process runs the
compute-only and one-worker steps at the same time, so they see the same CPU
contention as the training step (4 processes on a 2-core machine are
contended: read the 4-process times with that in mind). XLA runs one
thread per process.

It also times psum and all-gather at several sizes at each (P, rate), fits
the cost model to them (`gs.cost_model.calibrate`, shared-link topology),
and predicts every step: one-worker step time + modeled communication.
Bytes per worker come from `gs.comm_stats` of the real run. DiLoCo
(`gs.diloco`) rows at 1 and 0.1 Gbit/s are projected, not measured: the
compute-only step + one sync's modeled communication / H
(`diloco_projection`).

Run (as root, or where ``unshare -rn`` works):

  python -m benchmarks.network --out DIR [--quick]

writes DIR/network.json (rows, calibration samples, fitted networks, the
model's errors) and DIR/network.png. Where namespaces or ``tc`` are not
available it says so in one line and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import math
import os
import pathlib
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np

from benchmarks import _common
from benchmarks import _network_worker
import gsparse_jax as gs
from gsparse_jax._src import cost_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_COMPRESSORS = ("dense", "top_k", "rand_k", "arc_top_k",
                       "hard_threshold")
# About 1e6 and 2.5e7 parameters (1,058,058 and 25,175,050).
MODEL_WIDTHS = ((256, 1024, 768, 10), (1024, 4096, 4096, 1024, 10))
RATES = (None, 10.0, 1.0, 0.1)  # Gbit/s; None: unshaped loopback
RATIO = 0.01
# What a user gets from `gs.sparsify(c)`.
GRANULARITY = inspect.signature(gs.sparsify).parameters["granularity"].default
SLOW_S = 0.05  # the accuracy target covers steps above 50 ms
# DiLoCo rows (projected, not measured): a sync every H steps of the
# pseudo-gradient dense or as SparseLoCo's payload, at these rates.
DILOCO_SYNC_EVERY = (10, 50)
DILOCO_RATES = (1.0, 0.1)
DILOCO_PAYLOADS = (("dense", lambda: gs.dense()),
                   ("top1%+2bit", lambda: gs.quantized_top_k(0.01, bits=2)))

WORKER_ENV = {
    "JAX_PLATFORMS": "cpu",
    "JAX_NUM_CPU_DEVICES": "1",
    # One thread per worker process: P processes are P workers on P cores.
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def make_plan(*, widths=MODEL_WIDTHS, compressors=DEFAULT_COMPRESSORS,
              rates=RATES, calibrate=True, ratio=RATIO, granularity=GRANULARITY,
              batch_per_worker=8, min_repeats=3, max_repeats=7,
              cell_budget_s=10.0, calibration_max_bytes=2**26, lr=1e-3,
              seed=0) -> dict:
  """What every worker process runs (see `benchmarks._network_worker`)."""
  return dict(widths=[list(w) for w in widths], compressors=list(compressors),
              rates=list(rates), calibrate=calibrate, ratio=ratio,
              granularity=granularity,
              calibration_max_bytes=calibration_max_bytes,
              batch_per_worker=batch_per_worker, min_repeats=min_repeats,
              max_repeats=max_repeats, cell_budget_s=cell_budget_s, lr=lr,
              seed=seed)


# --------------------------------------------------------------------------
# The network namespace and its shaped loopback.


def _unshare_command() -> list[str]:
  # root can create a network namespace directly; elsewhere a user
  # namespace maps this user to root inside it (unshare -r).
  return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]


def tbf_burst_bytes(rate_gbit: float) -> int:
  """The token bucket's size: at least 256 KiB and 2 ms of traffic at the
  rate, so the 64 KiB loopback packets pass and high rates are reachable
  with the kernel's timer granularity."""
  return max(256 * 1024, int(rate_gbit * 1e9 / 8 * 2e-3))


def tbf_command(rate_gbit: float, device: str = "lo") -> list[str]:
  """``tc`` arguments shaping ``device`` to ``rate_gbit`` (token bucket)."""
  return ["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate",
          f"{rate_gbit * 1000:g}mbit", "burst",
          str(tbf_burst_bytes(rate_gbit)), "latency", "100ms"]


def namespace_problem() -> Optional[str]:
  """None if a network namespace with a shaped loopback can be made here."""
  for tool in ("unshare", "ip", "tc"):
    if shutil.which(tool) is None:
      return f"`{tool}` is not installed"
  script = "ip link set lo up && " + " ".join(tbf_command(1.0))
  try:
    probe = subprocess.run([*_unshare_command(), "sh", "-c", script],
                           capture_output=True, text=True, timeout=30,
                           check=False)
  except (OSError, subprocess.TimeoutExpired) as error:
    return f"`unshare` failed: {error}"
  if probe.returncode != 0:
    lines = (probe.stderr or probe.stdout).strip().splitlines()
    return (f"`{' '.join(_unshare_command())}` + `tc` failed: "
            f"{lines[-1] if lines else probe.returncode}")
  return None


class LoopbackShaper:
  """Sets the rate of this namespace's loopback (None: unshaped)."""

  def __init__(self, device: str = "lo"):
    self.device = device
    subprocess.run(["ip", "link", "set", device, "up"], check=True)

  def __call__(self, rate_gbit: Optional[float]) -> None:
    if rate_gbit is None:
      subprocess.run(["tc", "qdisc", "del", "dev", self.device, "root"],
                     capture_output=True, check=False)  # absent: fine
    else:
      subprocess.run(tbf_command(rate_gbit, self.device), check=True,
                     capture_output=True)


# --------------------------------------------------------------------------
# The launcher: P worker processes and the rate protocol of process 0.


def _pythonpath() -> str:
  """This checkout first, so `benchmarks` imports from any directory."""
  return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get(
      "PYTHONPATH")])])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_group(num_processes: int, plan: dict,
              set_rate: Callable[[Optional[float]], None], *,
              timeout_s: float, log_dir: str) -> dict:
  """Runs the plan on ``num_processes`` local processes; their records.

  Args:
    num_processes: P >= 2 processes of one CPU device each.
    plan: from `make_plan`.
    set_rate: called with each rate (Gbit/s or None) when the workers ask
      for it; returns once the link is shaped.
    timeout_s: every process is killed after this many seconds.
    log_dir: where each process's stderr (and stdout but process 0's) goes.

  Returns:
    ``{"samples": [...], "rows": [...]}``: the calibration samples and step
    rows the workers reported.

  Raises:
    RuntimeError: a process failed or the time ran out (with a log tail).
  """
  plan_path = os.path.join(log_dir, f"plan{num_processes}.json")
  with open(plan_path, "w") as f:
    json.dump(plan, f)
  coordinator = f"127.0.0.1:{free_port()}"
  env = {**os.environ, **WORKER_ENV, "PYTHONPATH": _pythonpath(),
         _network_worker.LAUNCHER_PID_ENV: str(os.getpid())}
  procs, logs = [], []
  records = {"SAMPLE": [], "ROW": []}
  deadline = time.monotonic() + timeout_s
  load_before = os.getloadavg()
  try:
    for i in range(num_processes):
      log = open(os.path.join(log_dir, f"p{num_processes}-{i}.log"), "w")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "benchmarks._network_worker",
           "--process-id", str(i), "--num-processes", str(num_processes),
           "--coordinator", coordinator, "--plan", plan_path],
          cwd=ROOT, env=env, stdin=subprocess.PIPE if i == 0 else None,
          stdout=subprocess.PIPE if i == 0 else log, stderr=log, text=True))
    _serve(procs, plan, set_rate, records, deadline)
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
      raise RuntimeError(f"process {failed[0]} of {num_processes} exited "
                         f"with {procs[failed[0]].returncode}:\n"
                         + _tail(logs[failed[0]].name))
  except subprocess.TimeoutExpired:
    raise RuntimeError(f"{num_processes} processes ran past {timeout_s:.0f} "
                       "s:\n" + _tail(logs[0].name)) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for log in logs:
      log.close()
  # The machine is shared: how busy it was says how far to trust the times.
  return {"samples": records["SAMPLE"], "rows": records["ROW"],
          "processes": num_processes,
          "load_average": {"before": list(load_before),
                           "after": list(os.getloadavg())}}


def _serve(procs, plan, set_rate, records, deadline) -> None:
  """Answers process 0's requests until it closes stdout."""
  leader = procs[0]
  # Raw reads: a buffered readline could pull two lines from the pipe and
  # leave the second unseen by select() (and process 0 waiting forever).
  fd = leader.stdout.fileno()
  pending = b""
  while True:
    if time.monotonic() > deadline:
      raise subprocess.TimeoutExpired("benchmarks._network_worker", 0)
    crashed = [p for p in procs[1:] if p.poll() not in (None, 0)]
    if crashed:
      return  # process 0 is stuck in a collective; the caller reports it
    readable, _, _ = select.select([fd], [], [], 1.0)
    if not readable:
      continue
    chunk = os.read(fd, 1 << 16)
    if not chunk:
      return
    pending += chunk
    *lines, pending = pending.split(b"\n")
    for line in lines:
      kind, _, payload = line.decode().strip().partition(" ")
      if kind == "RATE":
        set_rate(plan["rates"][int(payload)])
        leader.stdin.write("GO\n")
        leader.stdin.flush()
      elif kind in records:
        records[kind].append(json.loads(payload))


def _tail(path: str, lines: int = 30) -> str:
  with open(path) as f:
    return "".join(f.readlines()[-lines:])


# --------------------------------------------------------------------------
# The model: calibration, predictions, errors.


def in_steady_state(sample: dict) -> bool:
  """Whether a calibration sample fits the alpha-beta model on this link.

  A token bucket lets its first `tbf_burst_bytes` through at memory speed,
  so collectives that put only a few buckets' worth on the link look faster
  than the rate. The fit keeps the 4-byte samples (the latency) and those
  moving at least 8 buckets (the bandwidth); unshaped, every sample.
  """
  rate = sample["rate_gbit"]
  if rate is None or sample["num_bytes"] <= 4:
    return True
  _, sent = cost_model.ring_schedule(sample["collective"], sample["num_bytes"],
                                     sample["processes"])
  on_link = cost_model.link_bytes(sent, sample["processes"], "shared")
  return on_link >= 8 * tbf_burst_bytes(rate)


def fit_networks(samples: list) -> dict:
  """(processes, rate) -> the `Network` fitted to that group's collectives
  (those `in_steady_state`)."""
  groups = collections.defaultdict(list)
  for s in filter(in_steady_state, samples):
    groups[(s["processes"], s["rate_gbit"])].append(cost_model.Sample(
        s["num_bytes"], s["processes"], s["seconds"], s["collective"]))
  return {key: cost_model.calibrate(group, "shared")
          for key, group in groups.items()}


def predict(rows: list, networks: dict, ratio: float) -> list:
  """Adds the model's prediction to every row.

  ``predicted_s`` = the one-worker step (compute + selection, measured in
  the same run) + the modeled communication on the network fitted at the
  row's (processes, rate): `gs.cost_model.project_compressor` for each
  vector `sparsify` compresses (each leaf under layer granularity, with
  the compressor specialized to the leaf's shape; all leaves as one
  vector under global granularity).
  """
  # hard-threshold calibrates its threshold on a sample; the model reads only
  # its static wire sizes, which do not depend on the threshold.
  sample = np.random.default_rng(0).normal(size=4096).astype(np.float32)
  out = []
  for row in rows:
    compressor = gs.compressor_from_ratio(row["compressor"], ratio, sample)
    network = networks[(row["processes"], row["rate_gbit"])]
    shapes = _network_worker.mlp_shapes(row["widths"])
    if row["granularity"] == "global":
      vectors = [(compressor, row["params"])]
    else:
      vectors = [(compressor.for_shape(shape), math.prod(shape))
                 for shape in shapes]
    costs = [cost_model.project_compressor(c, size, row["processes"],
                                           network) for c, size in vectors]
    communication_s = sum(c.communication_s for c in costs)
    out.append({**row,
                "layout": compressor.layout,
                "selection_s": row["local_s"] - row["compute_s"],
                "model_communication_s": communication_s,
                "model_bytes_per_worker": sum(c.bytes_per_worker
                                              for c in costs),
                "predicted_s": row["local_s"] + communication_s})
  return out


def diloco_projection(rows: list, networks: dict) -> list:
  """Projected DiLoCo step times from a run's measurements.

  Not measured: per (processes, params) and rate of `DILOCO_RATES`, the
  measured compute-only step (forward, backward, SGD) plus the modeled
  communication of one sync (`gs.cost_model.project_compressor` of the
  pseudo-gradient, all leaves as one vector, on the network fitted at that
  rate) divided by H: ``step_s = compute_s + sync_s / H``. The sync's
  selection and the outer step are left out (once per H steps).

  Returns:
    Rows ``{processes, params, rate_gbit, method, sync_every, sync_s,
    step_s, bytes_per_step}``.
  """
  out = []
  measured = {(r["processes"], r["params"], r["rate_gbit"]): r for r in rows}
  for (processes, params, rate), row in sorted(
      measured.items(), key=lambda kv: (kv[0][0], kv[0][1], -(kv[0][2] or 0))):
    if rate not in DILOCO_RATES or (processes, rate) not in networks:
      continue
    for name, make in DILOCO_PAYLOADS:
      cost = cost_model.project_compressor(make(), params, processes,
                                           networks[(processes, rate)])
      for h in DILOCO_SYNC_EVERY:
        out.append({"processes": processes, "params": params,
                    "rate_gbit": rate, "method": f"diloco H={h} {name}",
                    "sync_every": h, "sync_s": cost.communication_s,
                    "step_s": row["compute_s"] + cost.communication_s / h,
                    "bytes_per_step": cost.bytes_per_worker / h})
  return out


def diloco_table(projected: list) -> list[str]:
  """The projected DiLoCo rows as Markdown: ms per step per rate."""
  rates = sorted({r["rate_gbit"] for r in projected}, reverse=True)
  lines = ["| P | params | method | bytes / step / worker | "
           + " | ".join(_rate_label(r) for r in rates) + " |",
           "|---|---|---|---|" + "---|" * len(rates)]
  keys = list(dict.fromkeys((r["processes"], r["params"], r["method"])
                            for r in projected))
  by_key = {(r["processes"], r["params"], r["method"], r["rate_gbit"]): r
            for r in projected}
  for processes, params, method in keys:
    cells = [f"{by_key[(processes, params, method, rate)]['step_s'] * 1e3:.1f}"
             if (processes, params, method, rate) in by_key else ""
             for rate in rates]
    first = next(r for r in projected if (r["processes"], r["params"],
                                          r["method"]) == (processes, params,
                                                           method))
    lines.append(f"| {processes} | {params:,} | {method} | "
                 f"{first['bytes_per_step']:,.0f} | " + " | ".join(cells)
                 + " |")
  return lines


def topology_check(samples: list) -> list:
  """One `Network` per link rate, fitted to the 2- and 4-process collectives
  together under each topology, and how well it reproduces them.

  The shared-link model must explain both worker counts with one bandwidth;
  the per-worker-link model cannot (on one loopback queue).
  """
  by_rate = collections.defaultdict(list)
  for s in filter(in_steady_state, samples):
    by_rate[s["rate_gbit"]].append(cost_model.Sample(
        s["num_bytes"], s["processes"], s["seconds"], s["collective"]))
  checks = []
  for rate, group in by_rate.items():
    if len({s.num_workers for s in group}) < 2:
      continue
    for topology in cost_model.TOPOLOGIES:
      net = cost_model.calibrate(group, topology)
      # Collectives of 1 MiB and more: where the bandwidth term matters.
      errors = [abs(cost_model.collective_seconds(
          s.collective, s.num_bytes, s.num_workers, net) - s.seconds)
                / s.seconds for s in group if s.num_bytes >= 2**20]
      checks.append({"rate_gbit": rate, "topology": topology,
                     **net._asdict(),
                     "median_error_from_1MiB": statistics.median(errors),
                     "worst_error_from_1MiB": max(errors)})
  return checks


def model_errors(rows: list) -> dict:
  """Median and worst relative error of ``predicted_s`` vs ``step_s``."""
  def summary(selected):
    errors = [abs(r["predicted_s"] - r["step_s"]) / r["step_s"]
              for r in selected]
    if not errors:
      return {"rows": 0, "median": None, "worst": None}
    worst = max(selected, key=lambda r: abs(r["predicted_s"] - r["step_s"])
                / r["step_s"])
    return {"rows": len(errors), "median": statistics.median(errors),
            "worst": max(errors),
            "worst_row": {k: worst[k] for k in ("compressor", "processes",
                                                 "rate_gbit", "params")}}
  slow = [r for r in rows if r["step_s"] > SLOW_S]
  errors = {"all": summary(rows), f"above_{SLOW_S * 1000:g}ms": summary(slow)}
  for processes in sorted({r["processes"] for r in rows}):
    errors[f"above_{SLOW_S * 1000:g}ms_{processes}_processes"] = summary(
        [r for r in slow if r["processes"] == processes])
  # Slow steps where the model says the network takes at least half.
  errors[f"above_{SLOW_S * 1000:g}ms_network_bound"] = summary(
      [r for r in slow if r.get("model_communication_s", 0.0)
       >= 0.5 * r["predicted_s"]])
  return errors


# --------------------------------------------------------------------------
# Output.


def _rate_label(rate) -> str:
  return "unshaped" if rate is None else f"{rate:g} Gbit/s"


def markdown_table(rows: list) -> list[str]:
  """Step time (ms) per compressor and rate, with the speedup over dense."""
  rates = sorted({r["rate_gbit"] for r in rows},
                 key=lambda r: math.inf if r is None else r)
  lines = ["| P | params | compressor | "
           + " | ".join(_rate_label(r) for r in rates) + " |",
           "|---|---|---|" + "---|" * len(rates)]
  by_key = {(r["processes"], r["params"], r["compressor"], r["rate_gbit"]): r
            for r in rows}
  groups = sorted({(r["processes"], r["params"]) for r in rows})
  for processes, params in groups:
    names = list(dict.fromkeys(r["compressor"] for r in rows
                               if (r["processes"], r["params"])
                               == (processes, params)))
    compute = [f"{by_key[(processes, params, names[0], rate)]['compute_s'] * 1e3:.1f}"
               if (processes, params, names[0], rate) in by_key else ""
               for rate in rates]
    lines.append(f"| {processes} | {params:,} | compute only | "
                 + " | ".join(compute) + " |")
    for name in names:
      cells = []
      for rate in rates:
        row = by_key.get((processes, params, name, rate))
        if row is None:
          cells.append("")
          continue
        cell = f"{row['step_s'] * 1e3:.1f}"
        if "speedup_over_dense" in row and name != "dense":
          cell += f" ({row['speedup_over_dense']:.2f}x)"
        if "predicted_s" in row:
          cell += f" [{row['predicted_s'] * 1e3:.1f}]"
        cells.append(cell)
      lines.append(f"| {processes} | {params:,} | {name} | "
                   + " | ".join(cells) + " |")
  return lines


def networks_table(networks: dict) -> list[str]:
  lines = ["| P | rate | fitted latency | fitted bandwidth | fitted overhead |",
           "|---|---|---|---|---|"]
  for (processes, rate), net in sorted(
      networks.items(), key=lambda kv: (kv[0][0], math.inf if kv[0][1] is None
                                        else kv[0][1])):
    bandwidth = ("inf" if math.isinf(net.bandwidth_bytes_per_s)
                 else f"{net.bandwidth_bytes_per_s * 8 / 1e9:.3g} Gbit/s")
    lines.append(f"| {processes} | {_rate_label(rate)} | "
                 f"{net.latency_s * 1e6:.0f} us | {bandwidth} | "
                 f"{net.overhead_s_per_byte * 1e9:.2f} ns/B |")
  return lines


def plot(axes, rows: list) -> None:
  """Step time vs rate, one panel per (P, params): points measured, lines
  predicted; unshaped at the right edge."""
  shaped = sorted({r["rate_gbit"] for r in rows if r["rate_gbit"]})
  unshaped_x = (max(shaped) * 10) if shaped else 1.0
  x_of = lambda rate: unshaped_x if rate is None else rate
  panels = sorted({(r["processes"], r["params"]) for r in rows})
  names = list(dict.fromkeys(r["compressor"] for r in rows))
  colors = dict(zip(names, ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728",
                            "#9467bd", "#8c564b", "#e377c2", "#17becf"]))
  flat = np.asarray(axes).reshape(-1)
  for ax, (processes, params) in zip(flat, panels):
    for name in names:
      mine = sorted((r for r in rows if (r["processes"], r["params"],
                                         r["compressor"])
                     == (processes, params, name)),
                    key=lambda r: x_of(r["rate_gbit"]))
      if not mine:
        continue
      xs = [x_of(r["rate_gbit"]) for r in mine]
      ax.plot(xs, [r["step_s"] * 1e3 for r in mine], "o",
              color=colors[name], label=name)
      if "predicted_s" in mine[0]:
        ax.plot(xs, [r["predicted_s"] * 1e3 for r in mine], "-",
                marker="_", markersize=16, color=colors[name], alpha=0.6)
    compute = sorted(((x_of(r["rate_gbit"]), r["compute_s"] * 1e3)
                      for r in rows if (r["processes"], r["params"])
                      == (processes, params) and r["compressor"] == names[0]))
    ax.plot([c[0] for c in compute], [c[1] for c in compute], ":",
            marker="x", color="black", label="compute only")
    ax.set_xscale("log")
    ax.set_yscale("log")
    has_unshaped = any(r["rate_gbit"] is None for r in rows)
    ax.set_xticks(shaped + [unshaped_x] * has_unshaped)
    ax.set_xticklabels([f"{t:g}" for t in shaped]
                       + ["unshaped"] * has_unshaped)
    ax.minorticks_off()
    ax.set_xlabel("loopback rate (Gbit/s)")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"{processes} processes, {params:,} params", fontsize=9)
    ax.legend(fontsize=7)
  for ax in flat[len(panels):]:
    ax.set_visible(False)


def assemble(groups: Sequence[dict], plan: dict) -> dict:
  """The JSON result from the launcher's records."""
  samples = [s for g in groups for s in g["samples"]]
  rows = [r for g in groups for r in g["rows"]]
  networks = fit_networks(samples) if samples else {}
  if networks:
    rows = predict(rows, networks, plan["ratio"])
  dense = {(r["processes"], r["params"], r["rate_gbit"]): r["step_s"]
           for r in rows if r["compressor"] == "dense"}
  for row in rows:
    key = (row["processes"], row["params"], row["rate_gbit"])
    if key in dense:
      row["speedup_over_dense"] = dense[key] / row["step_s"]
  return {
      "benchmark": "network",
      "machine": _common.machine_description(),
      "topology": "shared",
      "plan": plan,
      "rows": rows,
      "calibration_samples": samples,
      "load_average": {g["processes"]: g["load_average"] for g in groups
                       if "load_average" in g},
      "networks": [{"processes": p, "rate_gbit": rate, **net._asdict()}
                   for (p, rate), net in networks.items()],
      "model_errors": model_errors(rows) if networks else None,
      "diloco_projected": diloco_projection(rows, networks),
      "topology_check": topology_check(samples),
  }


def write_outputs(result: dict, out: str) -> None:
  rows = result["rows"]
  panels = sorted({(r["processes"], r["params"]) for r in rows})
  ncols = len({p for _, p in panels}) or 1
  nrows = -(-len(panels) // ncols) or 1
  _common.write_json(out, "network", result)
  _common.write_plot(out, "network", lambda axes: plot(axes, rows),
                     nrows=nrows, ncols=ncols,
                     title="Step time on a shaped loopback (points measured, "
                           "lines: cost model)")


def report(result: dict) -> list[str]:
  lines = ["Step time in ms (speedup over dense) [cost-model prediction]:", ""]
  lines += markdown_table(result["rows"])
  if result["networks"]:
    networks = {(n["processes"], n["rate_gbit"]): cost_model.Network(
        n["latency_s"], n["bandwidth_bytes_per_s"], n["overhead_s_per_byte"],
        n["topology"]) for n in result["networks"]}
    lines += ["", "Cost model fitted to the collectives (shared link):", ""]
    lines += networks_table(networks)
    if result["topology_check"]:
      lines += ["", "One network per rate fitted to 2 and 4 processes together "
                "(relative error on the collectives of 1 MiB and more):", ""]
      lines += ["| rate | topology | fitted bandwidth | median error | worst |",
                "|---|---|---|---|---|"]
      for c in result["topology_check"]:
        bandwidth = c["bandwidth_bytes_per_s"] * 8 / 1e9
        lines.append(f"| {_rate_label(c['rate_gbit'])} | {c['topology']} | "
                     f"{bandwidth:.3g} Gbit/s | "
                     f"{c['median_error_from_1MiB']:.1%} | "
                     f"{c['worst_error_from_1MiB']:.1%} |")
    if result.get("diloco_projected"):
      lines += ["", "DiLoCo, projected (not measured): the compute-only step "
                "+ one sync's modeled communication / H, ms per step:", ""]
      lines += diloco_table(result["diloco_projected"])
    lines.append("")
    for subset, e in result["model_errors"].items():
      if e["rows"]:
        lines.append(f"Model error ({subset.replace('_', ' ')}, {e['rows']} "
                     f"rows): median {e['median']:.1%}, worst {e['worst']:.1%}"
                     f" ({e['worst_row']})")
  return lines


# --------------------------------------------------------------------------
# Entry points.


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--quick", action="store_true",
                      help="2 processes, 1 Gbit/s, dense and top_k")
  parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--rates", nargs="+", default=None,
                      help="Gbit/s, or 'none' for unshaped")
  parser.add_argument("--compressors", nargs="+", default=None,
                      choices=gs.compressor_names())
  parser.add_argument("--granularity", choices=("layer", "global"),
                      default=GRANULARITY,
                      help="sparsify's granularity (default: sparsify's "
                           "own, %(default)s)")
  parser.add_argument("--timeout-s", type=float, default=None,
                      help="kill everything after this long")
  parser.add_argument("--from-json", metavar="DIR",
                      help="rebuild the model, table and plot from the "
                           "records in DIR/network.json (no measuring)")
  parser.add_argument("--inside-namespace", action="store_true",
                      help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def run_inside(args) -> int:
  """The benchmark proper, in the namespace `main` made."""
  _network_worker.die_with_parent()
  if args.quick:
    processes, rates, names = [2], [1.0], ["dense", "top_k"]
    timeout_s = args.timeout_s or 280.0
    timing = dict(max_repeats=5, cell_budget_s=5.0,
                  calibration_max_bytes=2**24)
  else:
    processes, rates, names = args.processes, list(RATES), list(
        DEFAULT_COMPRESSORS)
    timeout_s = args.timeout_s or 3 * 3600.0
    timing = {}
  if args.rates:
    rates = [None if r.lower() == "none" else float(r) for r in args.rates]
  names = args.compressors or names
  plan = make_plan(compressors=names, rates=rates,
                   granularity=args.granularity, **timing)
  shaper = LoopbackShaper()
  deadline = time.monotonic() + timeout_s
  groups = []
  log_dir = tempfile.mkdtemp(prefix="gsparse-network-")
  try:
    for n in processes:
      print(f"{n} processes: rates {[_rate_label(r) for r in rates]}, "
            f"{len(names)} compressors ...", flush=True)
      groups.append(run_group(n, plan, shaper, log_dir=log_dir,
                              timeout_s=deadline - time.monotonic()))
  except RuntimeError as error:
    print(f"benchmarks.network: failed ({error}); logs in {log_dir}",
          file=sys.stderr)
    return 1
  finally:
    shaper(None)
  shutil.rmtree(log_dir, ignore_errors=True)
  result = assemble(groups, plan)
  write_outputs(result, args.out)
  print("\n".join(report(result)))
  print(f"wrote {os.path.join(args.out, 'network.json')} and network.png")
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.from_json:
    with open(os.path.join(args.from_json, "network.json")) as f:
      old = json.load(f)
    result = assemble([{"samples": old["calibration_samples"],
                        "rows": old["rows"]}], old["plan"])
    result["load_average"] = old.get("load_average", {})
    write_outputs(result, args.out)
    print("\n".join(report(result)))
    return 0
  if args.inside_namespace:
    return run_inside(args)
  problem = namespace_problem()
  if problem is not None:
    print(f"benchmarks.network: skipped: needs a network namespace with a "
          f"shaped loopback ({problem}).")
    return 0
  env = {**os.environ, "PYTHONPATH": _pythonpath(),
         _network_worker.LAUNCHER_PID_ENV: str(os.getpid())}
  child = subprocess.Popen(
      [*_unshare_command(), sys.executable, "-m", "benchmarks.network",
       "--inside-namespace", *argv], env=env)
  try:
    return child.wait()
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()


if __name__ == "__main__":
  sys.exit(main())
