"""The compressors the package offers, by name: one row per compressor.

Tools that list or build compressors by name (the `gsparse` command, the
benchmarks, the contract test suite) read this table and nothing else, so a
new compressor is one module plus one row here.

Each row gives the public factory and how to build the compressor from a
target density alone (``from_ratio(ratio, sample)``; ``sample`` is a
representative gradient pytree, used by compressors that calibrate on data,
such as hard-threshold).

Example:
  >>> import gsparse_jax as gs
  >>> sorted(gs.compressor_names())[:2]
  ['approx_top_k', 'arc_top_k']
  >>> gs.compressor_from_ratio("top_k", 0.01).budget(1000)
  10
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from gsparse_jax._src import approximate
from gsparse_jax._src import arc_top_k
from gsparse_jax._src import cast
from gsparse_jax._src import compressors
from gsparse_jax._src import power_sgd
from gsparse_jax._src import qsgd
from gsparse_jax._src import quantized_top_k
from gsparse_jax._src import reg_top_k
from gsparse_jax._src import sign
from gsparse_jax._src import threshold_compressors
from gsparse_jax._src import validation


class CompressorEntry(NamedTuple):
  """One row of the registry.

  Attributes:
    name: the public name (`gsparse compare --compressors NAME`).
    factory: the public factory, e.g. `gsparse_jax.top_k`.
    from_ratio: ``(ratio, sample) -> Compressor``: the compressor at a
      target density with every other argument at its default.
    summary: one line for `gsparse info`.
    feedback: the error-feedback rule it is recommended with (`sparsify`'s
      ``feedback``): ``"none"`` for dense, ``"ef"`` for the rest (ARC-Top-K
      included: its paper pairs it with EF21, but with EF21-SGDM it
      diverged in `gsparse compare`'s runs where EF14 did not; the README
      has the figures).
    arguments: ``(ratio, sample) -> dict``: the keyword arguments of
      ``factory`` that ``from_ratio`` uses, so that a caller can override
      some (``factory(**{**arguments(ratio, sample), **options})``).
    needs_sample: True when ``from_ratio`` calibrates on a sample gradient
      (``sample`` must not be None); tools without one skip the compressor.
  """

  name: str
  factory: Callable[..., compressors.Compressor]
  from_ratio: Callable[[float, Any], compressors.Compressor]
  summary: str
  feedback: str = "ef"
  arguments: Callable[[float, Any], dict] = lambda ratio, sample: {}
  needs_sample: bool = False


def _hard_threshold_arguments(ratio: float, sample: Any) -> dict:
  if sample is None:
    raise ValueError("hard_threshold calibrates its threshold on a sample "
                     "gradient: pass `sample`.")
  return {"threshold": threshold_compressors.calibrate_threshold(sample,
                                                                 ratio),
          "capacity_ratio": min(1.0, 2.0 * ratio)}


def _hard_threshold_from_ratio(ratio: float, sample: Any
                               ) -> compressors.Compressor:
  return threshold_compressors.hard_threshold(
      **_hard_threshold_arguments(ratio, sample))


def _ratio_argument(ratio: float, sample: Any) -> dict:
  del sample
  return {"ratio": ratio}


def _at_ratio(factory):
  """``from_ratio`` of a factory whose first argument is the ratio."""
  return lambda ratio, sample: factory(ratio)


def _at_defaults(factory):
  """``from_ratio`` of a compressor without a ratio: its defaults."""
  return lambda ratio, sample: factory()


def _ratio_entry(name: str, factory, description: str) -> CompressorEntry:
  """The entry of a compressor built from the ratio alone."""
  return CompressorEntry(name, factory, _at_ratio(factory), description,
                         arguments=_ratio_argument)


def _defaults_entry(name: str, factory, description: str,
                    **options) -> CompressorEntry:
  """The entry of a compressor built with its defaults (ratio ignored)."""
  return CompressorEntry(name, factory, _at_defaults(factory), description,
                         **options)


_ENTRIES = (
    _defaults_entry("dense", compressors.dense,
                    "no compression: dense all-reduce (the baseline)",
                    feedback="none"),
    _ratio_entry("top_k", compressors.top_k,
                 "exact Top-k by magnitude"),
    _ratio_entry("rand_k", compressors.rand_k,
                 "k random entries, the same on every worker (no indices)"),
    CompressorEntry("hard_threshold", threshold_compressors.hard_threshold,
                    _hard_threshold_from_ratio,
                    "every |a| >= lambda (calibrated to the ratio on a sample)",
                    arguments=_hard_threshold_arguments,
                    needs_sample=True),
    _ratio_entry("gaussian_k", threshold_compressors.gaussian_k,
                 "threshold from a Gaussian fit (approximate Top-k)"),
    _ratio_entry("approx_top_k", approximate.approx_top_k,
                 "lax.approx_max_k (fast on TPU, exact elsewhere)"),
    _ratio_entry("reg_top_k", reg_top_k.reg_top_k,
                 "RegTop-k: Top-k demoting entries the workers cancel"),
    _ratio_entry("arc_top_k", arc_top_k.arc_top_k,
                 "ARC-Top-K: shared rows from a sketch, one all-reduce"),
    CompressorEntry("top_k_bf16", compressors.top_k,
                    lambda ratio, sample: compressors.top_k(
                        ratio, value_dtype="bfloat16"),
                    "exact Top-k, values sent in bfloat16 (6 B per entry)",
                    arguments=lambda ratio, sample: {
                        "ratio": ratio, "value_dtype": "bfloat16"}),
    _ratio_entry("quantized_top_k", quantized_top_k.quantized_top_k,
                 "exact Top-k, 2-bit values with a scale per 64 "
                 "(SparseLoCo; ~4.3 B per entry)"),
    _defaults_entry("power_sgd", power_sgd.power_sgd,
                    "PowerSGD rank 1 per matrix (granularity='layer'); "
                    "ratio ignored"),
    _defaults_entry("sign", sign.sign,
                    "scaled sign, 1 bit per entry (EF-signSGD); ratio "
                    "ignored"),
    _defaults_entry("qsgd", qsgd.qsgd,
                    "QSGD 4 bits, buckets of 512, unbiased; ratio ignored"),
    _defaults_entry("cast", cast.cast,
                    "dense all-reduce in bfloat16; ratio ignored"),
)

REGISTRY: dict[str, CompressorEntry] = {e.name: e for e in _ENTRIES}


def compressor_names() -> tuple[str, ...]:
  """The names of every compressor, in registry order."""
  return tuple(REGISTRY)


def compressor_from_ratio(name: str, ratio: float, sample: Optional[Any] = None
                          ) -> compressors.Compressor:
  """Builds the compressor ``name`` at target density ``ratio``.

  Args:
    name: one of `compressor_names()`.
    ratio: fraction of entries kept, in (0, 1] (ignored by ``"dense"``).
    sample: a representative gradient pytree, needed by compressors that
      calibrate on data (those whose entry has ``needs_sample``, e.g.
      ``"hard_threshold"``).

  Returns:
    A `Compressor`.

  Raises:
    ValueError: an unknown ``name``, a ``ratio`` outside (0, 1], or no
      ``sample`` for a compressor that needs one.
  """
  validation.choice(name, "name", compressor_names())
  validation.ratio(ratio)
  entry = REGISTRY[name]
  if entry.needs_sample and sample is None:
    raise ValueError(f"{name} calibrates on a sample gradient: pass "
                     "`sample`.")
  return entry.from_ratio(ratio, sample)
