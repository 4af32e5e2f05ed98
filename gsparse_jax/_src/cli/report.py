"""The table `gsparse compare` prints, with its time-to-target verdict."""

from __future__ import annotations

from gsparse_jax._src.cli import common
from gsparse_jax._src.cli import timing


def target_text(config: dict, metric: str) -> str:
  """The target and the link, e.g. ``accuracy >= 0.9333 at 1 Gbit/s, 8
  workers``."""
  sign = ">=" if timing.higher_is_better(metric) else "<="
  return (f"{metric} {sign} {config['target']:.4f} at "
          f"{config['bandwidth_gbit']:g} Gbit/s, {config['workers']} workers")


def print_table(results: dict, metric: str) -> None:
  """Prints the runs of ``results`` (results.json) and the verdict line."""
  from rich.table import Table  # pylint: disable=g-import-not-at-top

  config = results["config"]
  step_rule = ("max(compute, comm)" if config["overlap"]
               else "compute + comm")
  table = Table(title=(
      f"{config['task']}: {config['task_summary']}\n{config['workers']} "
      f"workers ({config['mapping']}), {config['steps']} steps, batch "
      f"{config['batch_size']}/worker, ratio {config['ratio']}, "
      f"{config['optimizer']} lr {config['lr']}, "
      + (f"DiLoCo: {config['optimizer']} inner, a sync every "
         f"{config['sync_every']} steps, outer SGD lr {config['outer_lr']} "
         f"momentum {config['outer_momentum']}, "
         if config.get("method") == "diloco" else "")
      + f"{config['num_params']:,} parameters"
      + (f", mean +- std over {config['seeds']} seeds"
         if config["seeds"] > 1 else "")
      + f"\nbytes and comm per step and worker; step = {step_rule} "
        f"(compute measured here, comm from gs.cost_model at "
        f"{config['bandwidth_gbit']:g} Gbit/s); target: "
        f"{target_text(config, metric)} ({config['target_rule']})"))
  first, second = (("test acc", "final_accuracy"), ("test loss", "final_loss"))
  if metric == "loss":
    first, second = second, first
  for header in ("compressor", "feedback"):
    table.add_column(header, no_wrap=True)
  for header in (first[0], second[0], "bytes/step", "vs dense", "comm/step",
                 "step", "to target (step)",
                 "wall s" if config["seeds"] == 1 else "wall s (all seeds)"):
    table.add_column(header, justify="right", no_wrap=True)

  def score(run, key):
    spread = run.get(f"{key}_std")
    return (f"{run[key]:.4f}" if spread is None
            else f"{run[key]:.4f} +- {spread:.4f}")

  for run in results["runs"]:
    to_target = run["time_to_target_s"]
    table.add_row(
        run["compressor"], run["feedback"], score(run, first[1]),
        score(run, second[1]), f"{run['bytes_per_step_per_worker']:,.0f}",
        f"{run['compression']:.1f}x",
        f"{run['projected_comm_s'] * 1e3:.3f} ms",
        f"{run['projected_step_s'] * 1e3:.2f} ms",
        "not reached" if to_target is None else
        f"{to_target:.3f} s ({run['steps_to_target']})",
        f"{run['wall_s']:.1f}")
  console = common.console()
  console.print(table)
  console.print(timing.verdict(results["runs"], target_text(config, metric)))
