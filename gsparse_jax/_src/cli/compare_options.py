"""The options of `gsparse compare`: the parser, and the checks that turn a
bad value into one line and exit 2 before anything is written."""

from __future__ import annotations

import os

from gsparse_jax._src.cli import common
from gsparse_jax._src.cli.specs import Spec, check_options, parse_compressors

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


def check_target(target, metric: str) -> None:
  """An accuracy target is at most 1 (``--target`` is positive already)."""
  if target is not None and metric == "accuracy" and target > 1:
    raise common.OptionError(f"--target: an accuracy target must be in "
                             f"(0, 1], got {target:g}")


def check_arguments(args) -> list[Spec]:
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


def registry_entry(spec: Spec):
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top
  return gs.COMPRESSORS[spec.name]
