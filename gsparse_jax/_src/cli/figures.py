"""The PNG plots of `gsparse compare`, drawn from its results.json runs."""

from __future__ import annotations

import os


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only: no display on servers and in CI
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def write_figures(out: str, runs: list[dict], metric: str, title: str
                  ) -> list[str]:
  """Writes the three plots of a comparison into ``out``.

  Args:
    out: an existing directory.
    runs: the ``runs`` of results.json (each with ``compressor`` and
      ``curves``).
    metric: ``"accuracy"`` or ``"loss"``: the held-out figure plotted.
    title: what was compared (task, workers, steps), for the titles.

  Returns:
    The paths written: ``{metric}_vs_step.png`` (training loss and the
    held-out figure against the step), ``{metric}_vs_bytes.png`` (the
    held-out figure against the cumulative bytes one worker sent, log x) and
    ``bytes_per_step.png`` (bytes per step per worker of each compressor,
    log y).
  """
  plt = _pyplot()
  key = f"eval_{metric}"
  label = f"held-out {metric}"
  # Where the curves are not: they rise (accuracy) or fall (loss) to the right.
  corner = "lower right" if metric == "accuracy" else "upper right"
  paths = []

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  for run in runs:
    curves = run["curves"]
    left.plot(curves["step"], curves["loss"], lw=0.8, label=run["compressor"])
    right.plot(curves["eval_step"], curves[key], marker=".",
               label=run["compressor"])
  left.set(xlabel="step", ylabel="training loss", yscale="log",
           title="training loss (mean over workers)")
  right.set(xlabel="step", ylabel=label, title=f"{label} vs step")
  right.legend(fontsize=8, loc=corner)
  fig.suptitle(title, fontsize=10)
  paths.append(_save(fig, plt, os.path.join(out, f"{metric}_vs_step.png")))

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for run in runs:
    curves = run["curves"]
    ax.plot(curves["eval_bytes"], curves[key], marker=".",
            label=run["compressor"])
  ax.set(xscale="log", xlabel="cumulative bytes sent per worker",
         ylabel=label, title=f"{label} vs bytes sent")
  ax.legend(fontsize=8, loc=corner)
  fig.suptitle(title, fontsize=9)
  paths.append(_save(fig, plt, os.path.join(out, f"{metric}_vs_bytes.png")))

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  names = [run["compressor"] for run in runs]
  sent = [run["bytes_per_step_per_worker"] for run in runs]
  # Colored by how the payloads travel: an all-gather's traffic grows with
  # the workers, an all-reduce's does not.
  layouts = [str(run.get("cost_layout")) for run in runs]
  colors = dict(zip(dict.fromkeys(layouts), plt.get_cmap("tab10").colors))
  bars = ax.bar(names, sent, color=[colors[l] for l in layouts])
  ax.bar_label(bars, labels=[f"{b:,.0f} B" for b in sent], fontsize=8)
  ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in
                     colors.values()],
            labels=[f"layout: {l}" for l in colors], fontsize=8)
  ax.set(yscale="log", ylabel="bytes per step per worker",
         title="bytes each worker sends per step")
  ax.set_ylim(top=max(sent) * 4)  # room for the labels and the legend
  ax.tick_params(axis="x", labelrotation=20)
  fig.suptitle(title, fontsize=9)
  paths.append(_save(fig, plt, os.path.join(out, "bytes_per_step.png")))
  return paths


def _save(fig, plt, path: str) -> str:
  try:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
  finally:
    plt.close(fig)
  return path
