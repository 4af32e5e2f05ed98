"""The PNG plots of `gsparse compare`, drawn from its results.json.

Every figure gives a compressor the same colour, marker and line style, and
labels it with its feedback rule; curves that coincide (Top-k and RegTop-k
often do) stay visible because each run draws on top of the one before it
with a thinner dashed line and a smaller marker of another shape.
"""

from __future__ import annotations

import os

import numpy as np

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
LINESTYLES = ("-", "--", "-.", ":")
SMOOTHING = 10  # steps in the running mean of the training loss


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only: no display on servers and in CI
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def styles(names: list[str], plt) -> dict[str, dict]:
  """Each compressor's line style, the same in every figure.

  Later runs draw above earlier ones (``zorder``) with thinner lines and
  smaller markers, so a curve hidden under another still shows its edge.
  """
  colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
  count = max(len(names) - 1, 1)
  return {name: dict(color=colors[i % len(colors)],
                     marker=MARKERS[i % len(MARKERS)],
                     linestyle=LINESTYLES[i % len(LINESTYLES)],
                     linewidth=2.2 - 1.2 * i / count,
                     markersize=7.5 - 3.5 * i / count,
                     alpha=0.85, zorder=2 + i)
          for i, name in enumerate(names)}


def title(config: dict) -> str:
  """What was compared: task, workers, steps, ratio, feedback and seeds."""
  seeds = config["seeds"]
  first = config["seed"]
  seed_text = (f"seed {first}" if seeds == 1 else
               f"mean of seeds {first}..{first + seeds - 1}")
  feedback = config["feedback"]
  feedback_text = (f"feedback {feedback} (all runs)"
                   if not feedback.startswith("recommended") else
                   "each compressor's recommended feedback (in the legend)")
  # Two lines: on one, a charlm title ran past the figure's right edge.
  method = (f", DiLoCo H={config['sync_every']}"
            if config.get("method") == "diloco" else "")
  return (f"{config['task']}, {config['workers']} workers{method}, "
          f"{config['steps']} steps, ratio {config['ratio']}\n"
          f"{feedback_text}, {seed_text}")


def _label(run: dict) -> str:
  return f"{run['compressor']} ({run['feedback']})"


def _running_mean(values, width: int) -> np.ndarray:
  values = np.asarray(values, dtype=float)
  if len(values) < width:
    return values
  kernel = np.ones(width) / width
  return np.convolve(values, kernel, mode="valid")


def write_figures(out: str, results: dict, metric: str) -> list[str]:
  """Writes the four plots of a comparison into ``out``.

  Args:
    out: an existing directory.
    results: results.json's content (``config`` and ``runs``; each run
      with ``compressor``, ``feedback``, ``curves``, the bytes and the
      projected step and time to target).
    metric: ``"accuracy"`` or ``"loss"``: the held-out figure plotted.

  Returns:
    The paths written: ``{metric}_vs_step.png`` (training loss and the
    held-out figure against the step), ``{metric}_vs_bytes.png`` (the
    held-out figure against the cumulative bytes one worker sent, log x),
    ``{metric}_vs_time.png`` (the held-out figure against the projected
    wall-clock time at the chosen bandwidth, the target marked) and
    ``bytes_per_step.png`` (bytes per step per worker, log y).
  """
  plt = _pyplot()
  config, runs = results["config"], results["runs"]
  style = styles([run["compressor"] for run in runs], plt)
  key = f"eval_{metric}"
  label = f"held-out {metric}"
  # Where the curves are not: they rise (accuracy) or fall (loss) to the right.
  corner = "lower right" if metric == "accuracy" else "upper right"
  suptitle = title(config)
  paths = []

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
  for run in runs:
    curves, s = run["curves"], style[run["compressor"]]
    smooth = _running_mean(curves["loss"], SMOOTHING)
    steps = curves["step"][len(curves["step"]) - len(smooth):]
    left.plot(steps, smooth, **{**s, "marker": None}, label=_label(run))
    right.plot(curves["eval_step"], curves[key], **s, label=_label(run))
  left.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"training loss (mean over workers, {SMOOTHING}-step "
                 "running mean)")
  right.set(xlabel="step", ylabel=label, title=f"{label} vs step")
  left.legend(fontsize=8, loc="upper right")
  right.legend(fontsize=8, loc=corner)
  paths.append(_save(fig, plt, suptitle,
                     os.path.join(out, f"{metric}_vs_step.png")))

  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for run in runs:
    curves = run["curves"]
    ax.plot(curves["eval_bytes"], curves[key], **style[run["compressor"]],
            label=_label(run))
  ax.set(xscale="log", xlabel="cumulative bytes sent per worker",
         ylabel=label, title=f"{label} vs bytes sent")
  ax.legend(fontsize=8, loc=corner)
  paths.append(_save(fig, plt, suptitle,
                     os.path.join(out, f"{metric}_vs_bytes.png")))

  paths.append(_time_figure(plt, out, config, runs, style, metric, corner,
                            suptitle))

  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  names = [run["compressor"] for run in runs]
  sent = [run["bytes_per_step_per_worker"] for run in runs]
  bars = ax.bar(names, sent, color=[style[n]["color"] for n in names])
  # How the payloads travel: an all-gather's traffic grows with the
  # workers, an all-reduce's does not.
  ax.bar_label(bars, labels=[f"{b:,.0f} B\n{run.get('cost_layout')}"
                             for b, run in zip(sent, runs)], fontsize=7)
  ax.legend(bars, [_label(run) for run in runs], fontsize=8,
            loc="upper right")
  ax.set(yscale="log", ylabel="bytes per step per worker",
         title="bytes each worker sends per step (label: layout)")
  # Room below the smallest bar and above for the labels and the legend.
  ax.set_ylim(min(sent) / 10, max(sent) * 30)
  ax.tick_params(axis="x", labelrotation=20)
  paths.append(_save(fig, plt, suptitle,
                     os.path.join(out, "bytes_per_step.png")))
  return paths


def _time_figure(plt, out, config, runs, style, metric, corner,
                 suptitle) -> str:
  """The held-out metric against projected wall-clock time, the target a
  dashed line and each run's first evaluation at it a star."""
  key = f"eval_{metric}"
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for run in runs:
    curves, s = run["curves"], style[run["compressor"]]
    seconds = np.asarray(curves["eval_step"]) * run["projected_step_s"]
    ax.plot(seconds, curves[key], **s,
            label=f"{_label(run)}, {run['projected_step_s'] * 1e3:.2f} "
                  "ms/step")
    if run["time_to_target_s"] is not None:
      ax.plot([run["time_to_target_s"]], [config["target"]], marker="*",
              markersize=13, color=s["color"], markeredgecolor="black",
              linestyle="none", zorder=20)
  ax.axhline(config["target"], color="gray", linestyle="--", linewidth=1,
             label=f"target {config['target']:.4f}", zorder=1)
  overlap = "overlapped" if config["overlap"] else "added"
  ax.set(xlabel=f"projected wall-clock seconds at "
                f"{config['bandwidth_gbit']:g} Gbit/s, {config['workers']} "
                f"workers (compute + comm {overlap})",
         ylabel=f"held-out {metric}",
         title=f"held-out {metric} vs projected time (star: target "
               "reached)")
  ax.legend(fontsize=8, loc=corner)
  return _save(fig, plt, suptitle, os.path.join(out, f"{metric}_vs_time.png"))


def _save(fig, plt, suptitle: str, path: str) -> str:
  try:
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
  finally:
    plt.close(fig)
  return path
