"""Runs every benchmark and rewrites the tables in benchmarks/README.md.

One command regenerates the figures on this machine:

  python -m benchmarks.report --out results

(`--from-json DIR` rebuilds the tables from JSON already written there;
`--quick` runs every benchmark at its smoke size, for checking the plumbing.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from benchmarks import bytes as bytes_benchmark
from benchmarks import scale_model
from benchmarks import selection
from benchmarks import step_overhead

README = pathlib.Path(__file__).with_name("README.md")
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


def run_all(out: str, quick: bool) -> None:
  flag = ["--quick"] if quick else []
  sizes = [] if quick else ["--sizes", "1e5", "1e6", "1e7"]
  selection.main(["--out", out, *flag, *sizes])
  step_overhead.main(["--out", out, *flag] + ([] if quick
                                               else ["--repeats", "9"]))
  bytes_benchmark.main(["--out", out, *flag])
  scale_model.main(["--out", out, *flag])


def _load(out: str, name: str) -> dict:
  with open(os.path.join(out, f"{name}.json")) as f:
    return json.load(f)


def selection_table(result: dict) -> list[str]:
  lines = ["| d | k | read+write pass | threshold | lax.top_k | torch.topk "
           "| threshold speedup vs lax.top_k / torch |",
           "|---|---|---|---|---|---|---|"]
  for row in result["results"]:
    methods = row["methods"]
    threshold = methods["threshold"]
    cells = []
    for name in ("threshold", "lax.top_k", "torch.topk"):
      m = methods.get(name)
      cells.append(f"{m['seconds'] * 1e3:.1f} ms ({m['ratio_to_read_write']:.2f}x)"
                   if m else "n/a")
    speedups = "/".join(
        f"{methods[n]['seconds'] / threshold['seconds']:.1f}x"
        if n in methods else "n/a" for n in ("lax.top_k", "torch.topk"))
    lines.append(f"| {row['size']:.0e} | {row['k']} | "
                 f"{row['floors']['read_write_s'] * 1e3:.1f} ms | "
                 + " | ".join(cells) + f" | {speedups} |")
  return lines


def step_table(result: dict) -> list[str]:
  shard = result["shard_map"]
  lines = [f"8 data-parallel devices, MLP of {shard['parameters']:,} "
           "parameters (plain step: the gradient all-reduced densely; "
           "compressed: local gradients, `sparsify` aggregates):", "",
           "| step | ms | / plain sgd step |", "|---|---|---|"]
  for name, row in shard["steps"].items():
    lines.append(f"| {name} | {row['seconds'] * 1e3:.2f} | "
                 f"{row['ratio_to_sgd']:.2f}x |")
  lines += ["", "Single device, jitted update of a flat vector of d "
            "parameters, state donated:", "",
            "| d | step | ms | ratio |", "|---|---|---|---|"]
  for size, rows in result["single_device"].items():
    for name, row in rows.items():
      if "ratio_to_sgd" in row:
        ratio = f"{row['ratio_to_sgd']:.2f}x sgd"
      else:
        ratio = f"{row['ratio_to_read_write']:.2f}x read+write pass"
      lines.append(f"| {int(size):.0e} | {name} | {row['seconds'] * 1e3:.2f}"
                   f" | {ratio} |")
  return lines


def bytes_table(result: dict) -> list[str]:
  counts = list(next(iter(result["results"].values())))
  lines = [f"d = {result['size']:,}, ratio {result['ratio']}; bytes one "
           "worker sends per step in a ring collective (fraction of dense):",
           "", "| compressor | layout | payload B | "
           + " | ".join(f"n={n}" for n in counts) + " |",
           "|---|---|---|" + "---|" * len(counts)]
  for name, rows in result["results"].items():
    first = rows[counts[0]]
    lines.append(
        f"| {name} | {first['layout']} | {first['payload_bytes']:.0f} | "
        + " | ".join(f"{rows[n]['traffic_bytes']:.0f} "
                     f"({rows[n]['traffic_vs_dense']:.3f})" for n in counts)
        + " |")
  return lines


def scale_lines(result: dict) -> list[str]:
  sel = result["selection"]
  wins = ", ".join(f"{k}: {v}" for k, v in result["wins"].items())
  return [f"Measured selection: {sel['seconds'] * 1e3:.1f} ms at d = "
          f"{sel['size']:.0e} (k = {sel['k']}); projected over "
          f"{len(result['points'])} (workers, parameters, Gbit/s) points, the "
          f"fastest layout wins: {wins}."]


def render(out: str) -> str:
  sections = [("Selection (float32 normal data)", selection_table,
               "selection"),
              ("Step overhead", step_table, "step_overhead"),
              ("Bytes per step", bytes_table, "bytes"),
              ("Scale model (alpha-beta)", scale_lines, "scale_model")]
  machine = _load(out, "selection")["machine"]
  lines = [BEGIN, "",
           f"Measured on {machine.get('cpu_model') or machine['platform']}, "
           f"{machine['cpu_count']} cores, {machine['backend']} backend, jax "
           f"{machine['jax']}. Medians of repeats; ratios are taken within "
           "one run.", ""]
  for title, table, name in sections:
    lines += [f"### {title}", ""] + table(_load(out, name)) + [""]
  lines.append(END)
  return "\n".join(lines)


def write_readme(out: str, readme: pathlib.Path = README) -> None:
  """Replaces the text between the report markers of ``readme``."""
  text = readme.read_text()
  start, end = text.index(BEGIN), text.index(END) + len(END)
  readme.write_text(text[:start] + render(out) + text[end:])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--from-json", action="store_true",
                      help="only rebuild the README from --out's JSON")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--readme", type=pathlib.Path, default=README)
  args = parser.parse_args(argv)
  if not args.from_json:
    run_all(args.out, args.quick)
  write_readme(args.out, args.readme)


if __name__ == "__main__":
  main()
