"""`gsparse advise`: projections against hand-computed figures, bad input."""

import re

import pytest

import gsparse_jax as gs
from gsparse_jax import cli

# 1e6 parameters, 4 workers, 1 Gbit/s (1.25e8 B/s), no latency, 1 ns per
# entry of selection (1 ms):
# - dense: all-reduce of 4e6 B, 2 * 3/4 * 4e6 / 1.25e8 = 48 ms;
# - rand_k(0.01): all-reduce of 1e4 values, 1.5 * 4e4 / 1.25e8 = 0.48 ms,
#   + 1 ms of selection = 1.48 ms. It ties with dense where
#   1.5 * (4e6 - 4e4) / beta = 1e-3 s: beta = 5.94e9 B/s = 47.52 Gbit/s.
ARGS = ["advise", "--params", "1e6", "--workers", "4", "--bandwidth-gbit",
        "1", "--latency-us", "0", "--selection-ns-per-element", "1"]


def _advise(capsys, args):
  code = cli.main(args)
  out = capsys.readouterr().out
  assert code == 0
  return out


def _rows(out):
  """compressor -> (layout, MB/worker, comm, select, step, rest of line)."""
  rows = {}
  for line in out.splitlines():
    fields = line.split()
    if len(fields) >= 7 and fields[0] in gs.compressor_names():
      rows[fields[0]] = (fields[1], *map(float, fields[2:6]),
                         " ".join(fields[7:]))
  return rows


def test_figures_match_the_hand_computed_ones(capsys):
  rows = _rows(_advise(capsys, ARGS))
  layout, megabytes, comm, select, step, wins = rows["dense"]
  assert (layout, megabytes, comm, select, step) == ("dense", 4.0, 48.0, 0.0,
                                                     48.0)
  assert wins == ""
  layout, megabytes, comm, select, step, wins = rows["rand_k"]
  assert (layout, megabytes, comm, select, step) == ("aligned", 0.04, 0.48,
                                                     1.0, 1.48)
  assert wins == "below 47.52 Gbit/s"


def test_every_compressor_is_listed_or_skipped_with_a_reason(capsys):
  out = _advise(capsys, ARGS)
  rows = _rows(out)
  skipped = re.findall(r"^skipped (\w+): (.+)$", out, re.M)
  assert not set(rows) & {name for name, _ in skipped}
  assert set(rows) | {name for name, _ in skipped} == set(
      gs.compressor_names())
  # Exactly the compressors the registry marks as calibrating on a sample.
  assert skipped == [
      (name, "it calibrates on a sample gradient (gsparse compare measures "
             "it on a model)")
      for name, entry in gs.COMPRESSORS.items() if entry.needs_sample]
  assert [name for name, _ in skipped] == ["hard_threshold"]
  # Every compressor but the baseline gets a break-even, whatever its layout
  # (a dense-layout compressor sending fewer bytes, e.g. a cast, too).
  assert rows["dense"][5] == ""
  assert all(row[5] for name, row in rows.items() if name != "dense")


def test_winner_and_break_even_are_read_off_the_table(capsys):
  out = _advise(capsys, ARGS)
  rows = _rows(out)
  fastest = min(rows, key=lambda name: rows[name][4])
  assert re.search(rf"^winner: {fastest} \(", out, re.M)
  below = {name: float(re.match(r"below (\S+) Gbit/s", row[5]).group(1))
           for name, row in rows.items() if row[5].startswith("below")}
  best = max(below, key=below.get)
  assert (f"break-even: compression wins below {below[best]:.4g} Gbit/s "
          f"({best})") in out


def test_free_selection_and_no_latency_make_fewer_bytes_always_win(capsys):
  # With no fixed cost the time gap to dense is (bytes gap) / beta: one
  # sign at every bandwidth, so no break-even exists.
  out = _advise(capsys, ARGS[:-1] + ["0"])
  assert _rows(out)["rand_k"][5] == "always (1e-4..1e5 Gbit/s)"
  assert "break-even: no compressor wins below a bandwidth" in out


def test_a_shared_link_carries_every_workers_bytes(capsys):
  rows = _rows(_advise(capsys, ARGS + ["--topology", "shared"]))
  # 4 workers on one link: 4 x 48 ms.
  assert rows["dense"][2] == 192.0


def test_selection_is_measured_when_not_given(capsys):
  out = _advise(capsys, ["advise", "--params", "5000", "--workers", "8",
                         "--bandwidth-gbit", "10"])
  assert "selection cost: measured on this machine" in out
  rows = _rows(out)
  assert rows["dense"][3] == 0.0  # dense selects nothing
  assert rows["top_k"][3] > 0.0


@pytest.mark.parametrize("option,value", [
    ("--params", "0"), ("--params", "many"), ("--workers", "0"),
    ("--workers", "2.5"), ("--bandwidth-gbit", "0"),
    ("--bandwidth-gbit", "-1"), ("--latency-us", "-1"),
    ("--selection-ns-per-element", "-1"),
    ("--selection-ns-per-element", "nan"), ("--ratio", "0"),
    ("--ratio", "1.5"), ("--topology", "ring"),
])
def test_bad_input_exits_2_with_one_line(capsys, option, value):
  args = list(ARGS)
  if option in args:
    args[args.index(option) + 1] = value
  else:
    args += [option, value]
  with pytest.raises(SystemExit) as exit_info:
    cli.main(args)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and option in lines[0], captured.err


def test_a_missing_required_option_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["advise", "--workers", "4", "--bandwidth-gbit", "1"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--params" in err[0]
