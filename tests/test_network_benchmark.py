"""`benchmarks.network`: the launcher on 2 real processes (unshaped, no root
needed), the JSON schema, the model's error summary, and the one-line exit
where no network namespace can be made."""

import inspect
import json
import math
import subprocess
import sys
import time

import pytest

from benchmarks import network
import gsparse_jax as gs

WIDTHS = (16, 32, 10)  # leaves of 32, 512, 10 and 320 entries: 874 params
ROW_KEYS = {"compressor", "processes", "rate_gbit", "params", "step_s",
            "compute_s", "local_s", "predicted_s", "bytes_per_worker",
            "model_bytes_per_worker", "model_communication_s",
            "selection_s", "layout", "granularity", "widths"}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  # Layer granularity (a budget per leaf), so that the byte count below is
  # worked by hand per leaf; the default (global) is what `main` runs.
  plan = network.make_plan(widths=[WIDTHS], compressors=["dense", "top_k"],
                           rates=[None], granularity="layer",
                           min_repeats=2, max_repeats=2,
                           cell_budget_s=0.1, calibration_max_bytes=2**16)
  rates = []
  group = network.run_group(2, plan, rates.append, timeout_s=240,
                            log_dir=str(tmp_path_factory.mktemp("logs")))
  return plan, rates, group


def test_launcher_runs_the_plan_on_two_processes(two_processes):
  plan, rates, group = two_processes
  # Process 0 asked for the (only) rate twice: calibration, then the model.
  assert rates == [None, None]
  assert [r["compressor"] for r in group["rows"]] == ["dense", "top_k"]
  # 4 B and 64 KiB, psum and all-gather.
  assert sorted((s["collective"], s["num_bytes"]) for s in group["samples"]
                ) == [("all_gather", 4), ("all_gather", 2**16),
                      ("all_reduce", 4), ("all_reduce", 2**16)]
  for row in group["rows"]:
    assert row["processes"] == 2 and row["params"] == 874
    assert row["step_s"] > 0 and row["compute_s"] > 0 and row["local_s"] > 0
  # gs.comm_stats of the real run: dense sends every value (4 B each); top_k
  # per leaf max(1, round(0.01 * size)) = 1 + 5 + 1 + 3 (value, index) pairs.
  sent = {r["compressor"]: r["bytes_per_worker"] for r in group["rows"]}
  assert sent == {"dense": 874 * 4, "top_k": 10 * 8}


def test_result_schema_and_outputs(two_processes, tmp_path):
  plan, _, group = two_processes
  result = network.assemble([group], plan)
  for row in result["rows"]:
    assert ROW_KEYS <= set(row)
    assert row["model_bytes_per_worker"] == row["bytes_per_worker"]
    assert row["predicted_s"] == pytest.approx(
        row["local_s"] + row["model_communication_s"])
  (fitted,) = result["networks"]
  assert (fitted["processes"], fitted["rate_gbit"], fitted["topology"]) == (
      2, None, "shared")
  assert result["model_errors"]["all"]["rows"] == 2
  network.write_outputs(result, str(tmp_path))
  with open(tmp_path / "network.json") as f:
    assert json.load(f)["rows"][0]["rate_gbit"] is None  # null unshaped
  assert (tmp_path / "network.png").stat().st_size > 0


def test_model_errors_median_and_worst():
  rows = [dict(compressor=c, processes=2, rate_gbit=1.0, params=1,
               step_s=step, predicted_s=predicted)
          for c, step, predicted in (("a", 0.01, 0.02),   # +100%, fast step
                                     ("b", 0.1, 0.11),    # +10%
                                     ("c", 1.0, 0.8),     # -20%
                                     ("d", 2.0, 2.1))]    # +5%
  errors = network.model_errors(rows)
  assert errors["all"]["median"] == pytest.approx(0.15)
  assert errors["all"]["worst"] == pytest.approx(1.0)
  slow = errors["above_50ms"]
  assert slow["rows"] == 3
  assert slow["median"] == pytest.approx(0.1)
  assert slow["worst"] == pytest.approx(0.2)
  assert slow["worst_row"]["compressor"] == "c"


def test_token_bucket_holds_two_ms_at_high_rates():
  args = network.tbf_command(10.0)
  assert args[args.index("rate") + 1] == "10000mbit"
  assert int(args[args.index("burst") + 1]) == math.ceil(10e9 / 8 * 2e-3)
  assert int(network.tbf_command(0.1)[args.index("burst") + 1]) == 256 * 1024


def test_calibration_keeps_latency_samples_and_those_past_the_burst():
  sample = lambda num_bytes, rate, processes=2, collective="all_reduce": dict(
      num_bytes=num_bytes, rate_gbit=rate, processes=processes,
      collective=collective)
  # 1 Gbit/s: a 256 KiB bucket, so 2 MiB must cross the link. An all-reduce
  # of B on 2 workers puts 2 * (2 * 1/2 * B) = 2 B there.
  assert network.in_steady_state(sample(2**20, 1.0))
  assert not network.in_steady_state(sample(2**19, 1.0))
  assert network.in_steady_state(sample(4, 1.0))  # the latency
  # An all-gather of b on 4 workers: 4 * 3 * b; 2 MiB / 12 = 174763 B.
  assert network.in_steady_state(sample(174763, 1.0, 4, "all_gather"))
  assert not network.in_steady_state(sample(174762, 1.0, 4, "all_gather"))
  assert network.in_steady_state(sample(2**16, None))  # unshaped: no bucket


def test_without_namespaces_it_says_so_and_writes_nothing(monkeypatch,
                                                          tmp_path, capsys):
  monkeypatch.setattr(network.shutil, "which",
                      lambda tool: None if tool == "tc" else "/bin/" + tool)
  out = tmp_path / "out"
  assert network.main(["--quick", "--out", str(out)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines == ["benchmarks.network: skipped: needs a network namespace "
                   "with a shaped loopback (`tc` is not installed)."]
  assert not out.exists()


def test_requests_arriving_in_one_write_are_all_answered():
  # Process 0 may write a record and a rate request in one chunk; the
  # launcher must see both (a buffered readline once hid the second and
  # left process 0 waiting for its answer).
  script = ("import sys\n"
            "sys.stdout.write('ROW {\"n\": 1}\\nRATE 0\\n'); sys.stdout.flush()\n"
            "assert sys.stdin.readline() == 'GO\\n'\n"
            "print('ROW {\"n\": 2}', flush=True)\n")
  leader = subprocess.Popen([sys.executable, "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
  rates, records = [], {"SAMPLE": [], "ROW": []}
  try:
    network._serve([leader], {"rates": [0.5]}, rates.append, records,
                   deadline=time.monotonic() + 30)
  finally:
    leader.kill()
    leader.wait()
  assert rates == [0.5]
  assert records["ROW"] == [{"n": 1}, {"n": 2}]


def test_diloco_projection_amortizes_one_sync_over_h_steps():
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src import cost_model  # pylint: disable=g-import-not-at-top
  rows = [dict(compressor="dense", processes=4, rate_gbit=rate, params=10**6,
               compute_s=0.02) for rate in (None, 10.0, 1.0, 0.1)]
  networks = {(4, rate): cost_model.Network(1e-3, rate * 1e9 / 8, 0.0,
                                            "shared")
              for rate in (1.0, 0.1)}
  projected = network.diloco_projection(rows, networks)
  assert {r["rate_gbit"] for r in projected} == {1.0, 0.1}
  assert len(projected) == 2 * 2 * 2  # rates x payloads x H
  k = 10**4  # Top-1% of 1e6: int32 indices, 2-bit codes, a scale per 64
  sparse_bytes = 4 * k + 4 * (-(-2 * k // 32) + -(-k // 64))
  for r in projected:
    h = r["sync_every"]
    assert r["step_s"] == pytest.approx(0.02 + r["sync_s"] / h)
    net = networks[(4, r["rate_gbit"])]
    if r["method"].endswith("dense"):
      assert r["bytes_per_step"] * h == 4 * 10**6
      assert r["sync_s"] == pytest.approx(
          cost_model.ring_all_reduce_seconds(4 * 10**6, 4, net))
    else:
      assert r["bytes_per_step"] * h == sparse_bytes
      assert r["sync_s"] == pytest.approx(cost_model.project_compressor(
          gs.quantized_top_k(0.01, bits=2), 10**6, 4, net).communication_s)
  table = network.diloco_table(projected)
  assert len(table) == 2 + 4 and "diloco H=50 top1%+2bit" in table[-1]


def test_default_granularity_is_sparsify_default():
  # The benchmark measures what a user gets from `gs.sparsify(c)`.
  default = inspect.signature(gs.sparsify).parameters["granularity"].default
  assert network.make_plan()["granularity"] == default == "global"
  assert network.parse_args(["--out", "x"]).granularity == default
