"""experiments.benchmark runs its row groups and reports ratios against a baseline timed
in the same process (a smoke test of the structure; speed itself is never asserted)."""
import pytest

from experiments import benchmark


@pytest.mark.slow  # ~55 s of compiles on 2 cores
def test_ranges_group_reports_ratios_beside_the_raw_rows():
  out = benchmark.run(batch=8, repeats=1, only=("ranges",))
  assert {"raw_s8_dot", "serving_w8a8", "percentile_search_vs_sort",
          "flax_qat_step_percentile_vs_absmax"} <= set(out)
  for row in out.values():
    assert row["ms"] > 0 and row["baseline_ms"] > 0
    assert row["ratio"] == pytest.approx(row["ms"] / row["baseline_ms"])


def test_unknown_group_is_refused():
  with pytest.raises(ValueError, match="unknown row groups"):
    benchmark.run(only=("nope",))


@pytest.mark.slow  # ~30 s of compiles on 2 cores
def test_decode_layouts_compares_every_serving_formulation_against_float():
  from experiments import decode_layouts  # pylint: disable=import-outside-toplevel
  out = decode_layouts.run([2], 1, ["w8", "w4g128"])
  assert set(out) == {"w8_b2", "w4g128_b2"}
  assert set(out["w8_b2"]) == {"kn", "nk", "nk_float", "nk_sliced", "float_ms",
                               "max_abs_kn_minus_nk"}
  assert out["w8_b2"]["max_abs_kn_minus_nk"] == 0.0  # same codes, same sums
  assert set(out["w4g128_b2"]) == {"kn", "kn_float", "kn_sliced", "float_ms"}  # kept [K, N]
  assert all(v > 0 for row in out.values() for k, v in row.items() if k != "max_abs_kn_minus_nk")


def test_host_cpu_names_the_model_and_amx():
  """Every report carries the CPU model (int8 / float ratios differ between CPUs)."""
  name = benchmark.host_cpu()
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    lines = f.read().splitlines()
  model = next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
  amx = any(l.startswith("flags") and "amx_int8" in l.split() for l in lines)
  assert name == model + (", AMX-INT8" if amx else "")
