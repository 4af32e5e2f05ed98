"""`gsparse compare`: train one model per compressor and compare them.

Every compressor trains the same Flax NNX model from the same initialization
on the same batches, with N workers (the devices of a mesh under
`jax.shard_map`, or simulated with `jax.vmap`). Prints a table (held-out
accuracy or loss, bytes per step per worker, compression, projected
communication and step time at a chosen bandwidth, projected time to a
target metric, wall time) and a one-line verdict, and writes results.json
and PNG plots into --out. With ``--diloco H`` every compressor is instead
the pseudo-gradient payload of `gs.diloco` (a sync every H steps).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import threading

from gsparse_jax._src.cli import common
from gsparse_jax._src.cli.compare_options import check_arguments
from gsparse_jax._src.cli.compare_options import check_target
from gsparse_jax._src.cli.compare_options import registry_entry
from gsparse_jax._src.cli.compare_options import build_compressor
from gsparse_jax._src.cli.compare_options import configure  # pylint: disable=unused-import (the subcommand's parser)

NAME = "compare"
HELP = ("train one model per compressor on the same data and compare "
        "accuracy, bytes sent and projected step time")



def requires(args) -> tuple[str, ...]:
  """Flax for the models, matplotlib for the plots, rich for the table and
  progress; scikit-learn for the digits, Orbax for checkpoints."""
  modules = ["flax", "matplotlib", "rich"]
  if args.task.startswith("digits"):
    modules.append("sklearn")
  if args.checkpoint_dir is not None:
    modules.append("orbax.checkpoint")
  return tuple(modules)


def run(args) -> int:
  specs = check_arguments(args)
  names = [spec.text for spec in specs]
  seeds = [args.seed + i for i in range(args.seeds)]
  devices = _workers_devices(args.workers, _simulated(args))
  settings = _settings(args)
  # Each compressor with its recommended feedback unless --feedback is
  # given; each seed its own initialization and batches.
  run_settings = {
      (spec.text, seed): dataclasses.replace(
          settings, seed=seed,
          feedback=args.feedback or registry_entry(spec).feedback)
      for spec in specs for seed in seeds}
  _check_checkpoints(args, run_settings)

  # Everything is valid: only now is anything computed or written.
  from gsparse_jax._src.cli import figures  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src.cli import tasks  # pylint: disable=g-import-not-at-top

  # matplotlib (a second of Python) imports on another thread while XLA,
  # without Python's lock, compiles the first model's initialization.
  threading.Thread(target=figures._pyplot, daemon=True).start()  # pylint: disable=protected-access
  try:
    task = tasks.load_task(args.task)
  except ValueError as error:
    raise common.OptionError(f"--task: {error}") from None
  check_target(args.target, task.metric)
  # A sample gradient (an eager backward pass) only for compressors that
  # calibrate on one (e.g. hard_threshold).
  calibrated = any(registry_entry(spec).needs_sample for spec in specs)
  samples = {seed: _sample_gradient(task, seed) if calibrated else None
             for seed in seeds}
  # Options reach the factories here; a bad value is still an option error.
  compressors = {(spec.text, seed): build_compressor(spec, args.ratio,
                                                     samples[seed])
                 for spec in specs for seed in seeds}
  os.makedirs(args.out, exist_ok=True)
  from gsparse_jax._src.cli import timing  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src.cli import training  # pylint: disable=g-import-not-at-top

  # One thread traces and compiles the steps in order while the runs
  # before train.
  with concurrent.futures.ThreadPoolExecutor(1) as pool, \
      _progress() as progress:
    trainings, outcomes = {}, {}
    for run_key, one in run_settings.items():
      trainings[run_key] = training.Run(task, compressors[run_key], one,
                                        devices)
      trainings[run_key].compile_on(pool)
    for (name, seed), one in run_settings.items():
      outcomes[name, seed] = _run_one(name, seed, trainings[name, seed],
                                      compressors[name, seed], one, args,
                                      progress)
  # Timed once nothing compiles beside them.
  for run_key, entry in outcomes.items():
    entry["compute_s_per_step"] = trainings[run_key].time_step()
    entry["projected_step_s"] = timing.projected_step_seconds(
        entry["compute_s_per_step"], entry["projected_comm_s"], args.overlap)
  runs = [combine_seeds([outcomes[name, seed] for seed in seeds])
          for name in names]
  target = add_time_to_target(runs, args.target, task.metric)
  num_params = next(iter(outcomes.values()))["num_params"]
  config = _config(args, names, settings, num_params, task, target)
  results = {"config": config, "runs": runs}
  path = os.path.join(args.out, "results.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  from gsparse_jax._src.cli import report  # pylint: disable=g-import-not-at-top
  pngs = figures.write_figures(args.out, results, task.metric)
  report.print_table(results, task.metric)
  print(f"wrote {path} and {', '.join(os.path.basename(p) for p in pngs)}")
  return 0


def add_time_to_target(runs: list[dict], target, metric: str) -> float:
  """Sets each run's (and each seed's) ``steps_to_target`` and
  ``time_to_target_s`` from its held-out curve; returns the target
  (``target``, or `timing.default_target` when None)."""
  from gsparse_jax._src.cli import timing  # pylint: disable=g-import-not-at-top

  if target is None:
    target = timing.default_target(runs, metric)
  for entry in [*runs, *(one for run in runs for one in run["per_seed"])]:
    curves = entry["curves"]
    steps = timing.steps_to_target(curves["eval_step"],
                                   curves[f"eval_{metric}"], target, metric)
    entry["steps_to_target"] = steps
    entry["time_to_target_s"] = timing.time_to_target(
        curves["eval_step"], curves[f"eval_{metric}"], target, metric,
        entry["projected_step_s"])
  return target


def _simulated(args) -> bool:
  """Whether the workers are simulated: --simulate, or DiLoCo, whose
  parameters differ between workers between syncs."""
  return args.simulate or args.diloco is not None


def _workers_devices(workers: int, simulate: bool):
  """The devices of the workers' mesh (None when simulating)."""
  import jax  # pylint: disable=g-import-not-at-top

  if simulate:
    return None
  common.request_cpu_devices(workers)
  devices = jax.devices()
  if len(devices) < workers:
    raise common.OptionError(
        f"--workers: {workers} workers need {workers} devices and "
        f"{len(devices)} are available; lower --workers or add --simulate")
  return devices[:workers]


def _settings(args):
  from gsparse_jax._src.cli import training  # pylint: disable=g-import-not-at-top

  return training.Settings(
      task=args.task, ratio=args.ratio, feedback=args.feedback,
      granularity=args.granularity, batch_size=args.batch_size, lr=args.lr,
      optimizer=args.optimizer, workers=args.workers, seed=args.seed,
      accumulate=args.accumulate, simulate=_simulated(args),
      eval_every=args.eval_every, sync_every=args.diloco,
      outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
      warmup_steps=args.warmup_steps, keep_dense=args.keep_dense)


def _run_dir(args, name: str, seed: int) -> str:
  return os.path.join(args.checkpoint_dir, name, f"seed-{seed}")


def _check_checkpoints(args, run_settings: dict) -> None:
  """A resume continues runs made with the same settings; a fresh start
  does not overwrite checkpoints. Reads only."""
  if args.checkpoint_dir is None:
    return
  from gsparse_jax._src.cli import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top

  metas = {run: checkpoints_lib.read_checkpoint_meta(_run_dir(args, *run))
           for run in run_settings}
  found = {f"{name} (seed {seed})": (meta, run_settings[name, seed])
           for (name, seed), meta in metas.items() if meta is not None}
  if not args.resume:
    if found:
      raise common.OptionError(
          f"--checkpoint-dir: {args.checkpoint_dir} already holds "
          f"checkpoints ({', '.join(found)}); add --resume to continue them "
          "or choose another directory")
    return
  if not found:
    raise common.OptionError(f"--resume: no checkpoint of these compressors "
                             f"in {args.checkpoint_dir}")
  for name, (meta, one) in found.items():
    current = dataclasses.asdict(one)
    for key, value in meta["settings"].items():
      if current.get(key) != value:
        option = "--" + key.replace("_", "-")
        raise common.OptionError(
            f"--resume: {name} was checkpointed with {option} {value}, "
            f"not {current.get(key)}; resume with the same options")
    if meta["step"] > args.steps:
      raise common.OptionError(
          f"--steps: {args.steps} is below step {meta['step']} of the "
          f"checkpoint of {name}")


def _sample_gradient(task, seed):
  """A gradient of the freshly initialized model (for compressors that
  calibrate on one, e.g. hard_threshold)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model = task.make_model(seed)
  x, y = task.batch(seed, 0, (16,))
  return nnx.grad(task.loss)(model, x, y)


def _run_one(name, seed, run, compressor, settings, args, progress) -> dict:
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src.cli import checkpoints as checkpoints_lib  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src.cli import timing  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src.cli import run_settings  # pylint: disable=g-import-not-at-top

  checkpoints, start, curves, wall_s = None, 0, None, 0.0
  if args.checkpoint_dir is not None:
    checkpoints = checkpoints_lib.Checkpoints(
        _run_dir(args, name, seed), args.checkpoint_every,
        dataclasses.asdict(settings))
    if args.resume and checkpoints.latest_step() is not None:
      run.state, curves, wall_s, start = checkpoints.restore(run.state)
  label = name if args.seeds == 1 else f"{name} seed {seed}"
  bar = progress.add_task(label, total=args.steps, completed=start, loss=0.0,
                          sent=0.0)
  outcome = run.train(
      args.steps, start=start, curves=curves, wall_s=wall_s,
      checkpoints=checkpoints,
      on_step=lambda p: progress.update(bar, completed=p.step, loss=p.loss,
                                        sent=p.sent_bytes))
  stats = outcome.stats
  network = gs.cost_model.network_from_gbit(args.bandwidth_gbit)
  layout = compressor.layout
  # DiLoCo communicates once per sync: a sync's time over its H steps.
  rounds_per_step = 1 / (args.diloco or 1)
  rounds = max(1, args.steps // (args.diloco or 1))
  return {
      "compressor": name,
      "seed": seed,
      "method": _method(args),
      "sync_every": args.diloco,
      "feedback": settings.feedback,
      "warmup_steps": settings.warmup_steps,
      "keep_dense_min_size": settings.keep_dense,
      "final_loss": outcome.final_loss,
      "final_accuracy": outcome.final_accuracy,
      "bytes_per_step_per_worker": stats["sent_bytes"] / args.steps,
      "dense_bytes_per_step_per_worker": stats["dense_bytes"] / args.steps,
      "compression": stats["compression"],
      "cost_layout": layout,
      "projected_comm_s": rounds_per_step * timing.mean_comm_seconds(
          compressor, run.param_leaves, args.granularity, args.workers,
          network, keep_dense=run_settings.keep_dense(settings),
          dense_rounds=min(settings.warmup_steps, rounds),
          rounds=rounds),
      "wall_s": outcome.wall_s,
      "curves": outcome.curves._asdict(),
      "num_params": outcome.num_params,
  }


PER_SEED_KEYS = ("seed", "final_loss", "final_accuracy",
                 "bytes_per_step_per_worker", "compression",
                 "compute_s_per_step", "projected_step_s", "wall_s", "curves")


def combine_seeds(per_seed: list[dict]) -> dict:
  """One compressor's entry of results.json from its runs, one per seed.

  ``final_loss``, ``final_accuracy``, the bytes, the compression, the
  measured and projected step times and the curves are means over the
  seeds; ``*_std`` the sample standard deviation (ddof=1; null for one
  seed); ``wall_s`` the total; ``per_seed`` keeps each run's own figures.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  first = per_seed[0]
  mean = lambda values: float(np.mean(values))
  std = lambda values: (float(np.std(values, ddof=1)) if len(values) > 1
                        else None)
  combined = {"compressor": first["compressor"],
              "method": first["method"], "sync_every": first["sync_every"],
              "feedback": first["feedback"],
              "warmup_steps": first["warmup_steps"],
              "keep_dense_min_size": first["keep_dense_min_size"],
              "seeds": [run["seed"] for run in per_seed]}
  for key in ("final_loss", "final_accuracy"):
    values = [run[key] for run in per_seed]
    combined[key], combined[f"{key}_std"] = mean(values), std(values)
  for key in ("bytes_per_step_per_worker", "dense_bytes_per_step_per_worker",
              "compression", "compute_s_per_step", "projected_step_s"):
    combined[key] = mean([run[key] for run in per_seed])
  # The wire of a compressor does not depend on the seed.
  combined.update(cost_layout=first["cost_layout"],
                  projected_comm_s=first["projected_comm_s"],
                  wall_s=sum(run["wall_s"] for run in per_seed))
  curves = {}
  for key, value in first["curves"].items():
    if key in ("step", "eval_step"):  # the same steps for every seed
      curves[key] = value
    else:
      curves[key] = np.mean([run["curves"][key] for run in per_seed],
                            axis=0).tolist()
  combined["curves"] = curves
  combined["per_seed"] = [{key: run[key] for key in PER_SEED_KEYS}
                          for run in per_seed]
  return combined


def _config(args, names, settings, num_params, task, target) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  config = dataclasses.asdict(settings)
  config.update(
      feedback=args.feedback or "recommended (per compressor)",
      seeds=args.seeds,
      task_summary=task.summary, metric=task.metric, compressors=names,
      steps=args.steps, bandwidth_gbit=args.bandwidth_gbit,
      overlap=args.overlap, target=target,
      target_rule=("--target" if args.target is not None else
                   "within 5% of dense's final " + task.metric),
      num_params=num_params,
      mapping="vmap (simulated)" if _simulated(args) else "shard_map",
      method=_method(args), sync_every=args.diloco,
      backend=jax.default_backend())
  return config


def _method(args) -> str:
  """``"diloco"`` under --diloco, else ``"data-parallel"``."""
  return "data-parallel" if args.diloco is None else "diloco"


class _NoProgress:
  """Stands in for a rich progress display when stderr is not a terminal."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def add_task(self, *args, **kwargs):
    return 0

  def update(self, *args, **kwargs):
    pass


def _progress():
  from rich import progress  # pylint: disable=g-import-not-at-top
  from rich.console import Console  # pylint: disable=g-import-not-at-top

  console = Console(stderr=True)
  if not console.is_terminal:
    return _NoProgress()
  return progress.Progress(
      progress.TextColumn("{task.description:<14}"), progress.BarColumn(),
      progress.MofNCompleteColumn(),
      progress.TextColumn("loss {task.fields[loss]:.4f}"),
      progress.TextColumn("sent {task.fields[sent]:,.0f} B"),
      progress.TimeElapsedColumn(), console=console)
