"""The compressors of `gsparse compare --compressors`: names and options.

``NAME`` or ``NAME:KEY=VALUE[,KEY=VALUE...]`` per compressor, parsed into a
`Spec` whose options reach the registry factory.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple


class Spec(NamedTuple):
  """One compressor of ``--compressors``: its registry name and options."""

  name: str
  options: dict

  @property
  def text(self) -> str:
    """The run's name: the spec as given, ``name[:key=value,...]``."""
    if not self.options:
      return self.name
    return self.name + ":" + ",".join(
        f"{key}={_format_value(value)}" for key, value in self.options.items())


def _format_value(value) -> str:
  if value is None:
    return "none"
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def parse_value(text: str):
  """An option's value: int, then float, then true/false/none, else text."""
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered == "none":
    return None
  return text


def parse_compressors(text: str, known) -> list[Spec]:
  """Parses ``--compressors``: ``spec[,spec...]``.

  Grammar: items separated by ``,``. An item ``NAME`` or ``NAME:KEY=VALUE``
  starts a compressor; an item ``KEY=VALUE`` (it has ``=`` and no ``:``)
  adds an option to the compressor before it. So
  ``power_sgd:rank=4,warm_start=false,top_k`` is two compressors. Names
  never contain ``=``, which is what tells the two apart. Values are
  parsed by `parse_value`; they cannot contain ``,`` or ``:``.

  Raises:
    ValueError: one line naming the problem (unknown name, an option before
      any compressor, a malformed or repeated option, a repeated spec).
  """
  specs: list[Spec] = []
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    if ":" in item:
      name, option = (part.strip() for part in item.split(":", 1))
    elif "=" in item:
      if not specs:
        raise ValueError(f"option {item!r} comes before any compressor "
                         "(write NAME:KEY=VALUE)")
      name, option = None, item
    else:
      name, option = item, ""
    if name is not None:
      if name not in known:
        raise ValueError(f"unknown compressor {name!r}; choose from "
                         f"{', '.join(known)} (comma-separated) or all")
      specs.append(Spec(name, {}))
    if option:
      spec = specs[-1]
      key, equals, value = (part.strip() for part in option.partition("="))
      if not equals or not key or not value or ":" in value:
        raise ValueError(f"{spec.name}: option {option!r} is not KEY=VALUE "
                         "(separate options with ',')")
      if key in spec.options:
        raise ValueError(f"{spec.name}: option {key!r} is given twice")
      spec.options[key] = parse_value(value)
  if not specs:
    raise ValueError(f"no compressor given; choose from {', '.join(known)} "
                     "(comma-separated) or all")
  texts = [spec.text for spec in specs]
  for t in texts:
    if texts.count(t) > 1:
      raise ValueError(f"{t} is listed twice")
  return specs


def check_options(spec: Spec, factory) -> None:
  """Raises ValueError unless every option of ``spec`` is a keyword
  parameter of ``factory``."""
  parameters = [p.name for p in inspect.signature(factory).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  for key in spec.options:
    if key not in parameters:
      accepted = ", ".join(parameters) if parameters else "no options"
      raise ValueError(f"{spec.name}: unknown option {key!r} (gs."
                       f"{factory.__name__} takes {accepted})")
