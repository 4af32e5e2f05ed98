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
from gsparse_jax._src.cli.specs import Spec, check_options, parse_compressors

NAME = "compare"
HELP = ("train one model per compressor on the same data and compare "
        "accuracy, bytes sent and projected step time")

DEFAULT_COMPRESSORS = ("dense", "cast", "top_k", "rand_k", "reg_top_k",
                       "arc_top_k")
TASK_NAMES = ("digits-mlp", "digits-cnn", "charlm")
OPTIMIZER_NAMES = ("adam", "adamw", "sgd", "momentum")


def configure(parser) -> None:
  positive_int = common.bounded(int, 1)
  positive = common.bounded(float, 0, low_open=True)
  parser.add_argument("--task", default="digits-mlp",
                      help=f"what to train: {', '.join(TASK_NAMES)}, or "
                           "your own gs.Task as FILE.py:NAME or "
                           "package.module:NAME (a Task or a zero-argument "
                           "callable returning one; default: digits-mlp)")
  parser.add_argument(
      "--compressors", default=",".join(DEFAULT_COMPRESSORS),
      help="comma-separated compressors (see `gsparse info`), or 'all'. A "
           "compressor takes factory options as NAME:KEY=VALUE, more of "
           "them as further ,KEY=VALUE items (an item with '=' belongs to "
           "the compressor before it), e.g. 'top_k,power_sgd:rank=4,"
           "warm_start=false,hard_threshold:capacity_ratio=0.05'; VALUEs "
           "are read as int, float, true/false, none or text; options "
           "override the ones --ratio sets; the run is named by its whole "
           "spec (default: %(default)s)")
  common.add_ratio_option(parser)
  parser.add_argument("--feedback", default=None,
                      help="error feedback of every run: none, ef, ef21, "
                           "ef21m (default: each compressor's recommended "
                           "rule, gs.COMPRESSORS[name].feedback: none for "
                           "dense, ef for the rest)")
  parser.add_argument("--granularity", default="global",
                      help="global or layer (default: global)")
  parser.add_argument(
      "--warmup-steps", type=common.bounded(int, 0), default=0, metavar="N",
      help="the first N optimizer steps (under --diloco: syncs) all-reduce "
           "densely, then the compressor takes over (sparsify's "
           "warmup_steps; default: 0)")
  parser.add_argument(
      "--keep-dense", type=common.bounded(int, 0), default=None,
      metavar="MIN_SIZE",
      help="all-reduce densely the leaves of rank <= 1 or of fewer than "
           "MIN_SIZE entries (biases, norms: sparsify's keep_dense="
           "gs.small_or_vector_leaves(MIN_SIZE)); default: every leaf "
           "compressed")
  parser.add_argument("--steps", type=positive_int, default=300,
                      help="optimizer steps (default: 300)")
  parser.add_argument("--batch-size", type=positive_int, default=16,
                      help="examples per worker and micro-batch "
                           "(default: 16)")
  parser.add_argument("--lr", type=positive, default=3e-3,
                      help="learning rate (default: 0.003)")
  parser.add_argument("--optimizer", default="adam", choices=OPTIMIZER_NAMES,
                      help="applied to the aggregated update (default: adam)")
  parser.add_argument("--workers", type=positive_int, default=8,
                      help="data-parallel workers (default: 8)")
  parser.add_argument("--seed", type=int, default=0,
                      help="initialization and batches (default: 0)")
  parser.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                      help="train each compressor N times, with seeds "
                           "--seed, --seed+1, ... (other initializations "
                           "and batches); the table shows mean +- std "
                           "(default: 1)")
  parser.add_argument("--accumulate", type=positive_int, default=1,
                      metavar="N", help="micro-batches per optimizer step, "
                      "compressed and sent once (gs.multi_steps; default: 1)")
  parser.add_argument("--eval-every", type=positive_int, default=10,
                      help="score the held-out data every this many steps "
                           "(default: 10)")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="save Orbax checkpoints of every run here")
  parser.add_argument("--checkpoint-every", type=positive_int, default=50,
                      help="steps between checkpoints (default: 50)")
  parser.add_argument("--resume", action="store_true",
                      help="continue the runs checkpointed in "
                           "--checkpoint-dir")
  parser.add_argument("--out", default=os.path.join("results", "compare"),
                      help="directory for results.json and the plots "
                           "(default: %(default)s)")
  parser.add_argument("--bandwidth-gbit", type=positive, default=1.0,
                      help="link speed for the projected communication "
                           "and step time, Gbit/s (default: 1)")
  parser.add_argument("--overlap", action="store_true",
                      help="assume communication overlaps compute: a "
                           "projected step is the larger of the two, not "
                           "their sum")
  parser.add_argument("--target", type=positive, default=None,
                      help="held-out accuracy to reach (a loss to get "
                           "down to, for a task scored by loss) for the "
                           "time-to-target column (default: within 5%% of "
                           "dense's final figure: 0.95 x its accuracy, "
                           "1.05 x its loss)")
  parser.add_argument("--simulate", action="store_true",
                      help="simulate the workers with jax.vmap on one device")
  parser.add_argument(
      "--diloco", type=common.bounded(int, 1), default=None, metavar="H",
      help="compare compressed DiLoCo instead of data parallelism: "
           "gs.diloco(OPTIMIZER, outer, sync_every=H, compressor=C, "
           "feedback=F), each worker taking H local steps with --optimizer "
           "and every compressor sending the pseudo-gradient once per H "
           "steps; bytes are counted per sync (one round), the projected "
           "communication per step is a sync's over H; the workers are "
           "simulated (jax.vmap), the model scored is the anchor")
  parser.add_argument("--outer-lr", type=positive, default=0.7,
                      help="DiLoCo's outer SGD learning rate (default: 0.7)")
  parser.add_argument("--outer-momentum",
                      type=common.bounded(float, 0, 1, low_open=False),
                      default=0.9,
                      help="DiLoCo's outer Nesterov momentum, 0 for plain "
                           "SGD (default: 0.9, as in DiLoCo)")


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
  specs = _check_options(args)
  names = [spec.text for spec in specs]
  seeds = [args.seed + i for i in range(args.seeds)]
  devices = _workers_devices(args.workers, _simulated(args))
  settings = _settings(args)
  # Each compressor with its recommended feedback unless --feedback is
  # given; each seed its own initialization and batches.
  run_settings = {
      (spec.text, seed): dataclasses.replace(
          settings, seed=seed,
          feedback=args.feedback or _registry_entry(spec).feedback)
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
  _check_target(args.target, task.metric)
  # A sample gradient (an eager backward pass) only for compressors that
  # calibrate on one (e.g. hard_threshold).
  calibrated = any(_registry_entry(spec).needs_sample for spec in specs)
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


def _check_target(target, metric: str) -> None:
  """An accuracy target is at most 1 (``--target`` is positive already)."""
  if target is not None and metric == "accuracy" and target > 1:
    raise common.OptionError(f"--target: an accuracy target must be in "
                             f"(0, 1], got {target:g}")


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


def _check_options(args) -> list[Spec]:
  """Every check that needs no JAX computation; returns the compressors."""
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top

  known = gs.compressor_names()
  if args.compressors.strip() == "all":
    specs = [Spec(name, {}) for name in known]
  else:
    try:
      specs = parse_compressors(args.compressors, known)
    except ValueError as error:
      raise common.OptionError(f"--compressors: {error}") from None
  for spec in specs:
    try:
      check_options(spec, gs.COMPRESSORS[spec.name].factory)
    except ValueError as error:
      raise common.OptionError(f"--compressors: {error}") from None
  for option, value, build in (
      ("--feedback", args.feedback or "ef",
       lambda v: gs.sparsify(gs.dense(), feedback=v)),
      ("--granularity", args.granularity,
       lambda v: gs.sparsify(gs.dense(), granularity=v))):
    try:
      build(value)
    except ValueError as error:
      raise common.OptionError(f"{option}: {error}") from None
  if args.diloco is not None and args.keep_dense is not None:
    raise common.OptionError("--keep-dense: leaves kept dense are for data "
                             "parallelism, not with --diloco")
  if args.diloco is not None and args.accumulate > 1:
    raise common.OptionError("--accumulate: gradient accumulation is for "
                             "data parallelism, not with --diloco")
  common.check_writable_dir(args.out, "--out")
  if args.checkpoint_dir is not None:
    common.check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
  elif args.resume:
    raise common.OptionError("--resume: needs --checkpoint-dir DIR (where "
                             "the runs were checkpointed)")
  return specs


def build_compressor(spec: Spec, ratio: float, sample):
  """The compressor of ``spec``: its factory called with the arguments
  ``--ratio`` sets, overridden by the spec's options."""
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top

  entry = gs.COMPRESSORS[spec.name]
  if not spec.options:
    return entry.from_ratio(ratio, sample)
  arguments = {**entry.arguments(ratio, sample), **spec.options}
  try:
    return entry.factory(**arguments)
  except (ValueError, TypeError) as error:
    raise common.OptionError(
        f"--compressors: {spec.text}: {error}".splitlines()[0]) from None


def _registry_entry(spec: Spec):
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top
  return gs.COMPRESSORS[spec.name]


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
  from gsparse_jax._src.cli import training  # pylint: disable=g-import-not-at-top

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
          network, keep_dense=training.keep_dense(settings),
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
