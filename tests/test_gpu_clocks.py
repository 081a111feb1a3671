"""gpu_clocks: nvidia-smi's samples parsed and summed up; a stand-in nvidia-smi on PATH."""
import time

import pytest

from experiments.benchmarks import gpu_clocks

import _fake_nvidia_smi

@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
  return _fake_nvidia_smi.install(tmp_path, monkeypatch, "1500, 2619, 300, 40, 0x1")


def test_reasons_decodes_the_mask():
  assert gpu_clocks.reasons(0) == []
  assert gpu_clocks.reasons(0x4) == ["software power cap"]
  assert gpu_clocks.reasons(0x1 | 0x8 | 0x20) == [
      "idle", "hardware slowdown", "software thermal slowdown"]
  assert gpu_clocks.reasons(0x4 | 0x1000) == ["software power cap", "0x1000"]


def test_parse_skips_what_is_not_a_sample():
  lines = ["clocks.current.sm [MHz], ...", "1980, 3201, 612.40, 55, 0x0000000000000004",
           "1755, 3201, [N/A], 61, 0x0000000000000000", "1650, 32"]
  samples = gpu_clocks.parse(lines)
  assert samples == [
      dict(sm_mhz=1980.0, mem_mhz=3201.0, power_w=612.4, temperature_c=55.0, reasons=4),
      dict(sm_mhz=1755.0, mem_mhz=3201.0, power_w=None, temperature_c=61.0, reasons=0)]


def test_summarize_against_hand_computed_figures():
  samples = gpu_clocks.parse([
      "1980, 3201, 500, 50, 0x0", "1830, 3201, 690, 58, 0x4", "1755, 3201, 700, 61, 0x4",
      "1830, 3201, [N/A], 60, 0x24"])
  s = gpu_clocks.summarize(samples)
  assert s == dict(samples=4, sm_mhz_median=1830.0, sm_mhz_min=1755.0, sm_mhz_max=1980.0,
                   mem_mhz_median=3201.0, power_w_median=690.0, power_w_max=700.0,
                   temperature_c_max=61.0,
                   reasons={"software power cap": 0.75, "software thermal slowdown": 0.25})
  assert gpu_clocks.one_line(s) == ("clocks: SM 1830 MHz (1755–1980), 690 W, 61 °C, "
                                    "software power cap 75%, software thermal slowdown 25%")
  assert gpu_clocks.summarize([]) == {"error": "no samples"}


def test_without_nvidia_smi_nothing_runs_and_the_work_goes_on(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi
  with gpu_clocks.sampling() as clocks:
    done = True
  assert done
  assert clocks.summary() == {"error": "nvidia-smi not found"}
  assert gpu_clocks.one_line(clocks.summary()) == "clocks: nvidia-smi not found"


def test_samples_while_the_block_runs(fake_smi, monkeypatch):
  monkeypatch.setenv("FAKE_SMI_SAMPLES", "1980, 3201, 650.5, 57, 0x4;1785, 3201, 700, 59, 0x4")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
  with gpu_clocks.sampling(interval_ms=20) as clocks:
    time.sleep(1.0)
  s = clocks.summary()
  assert s["samples"] >= 3, s  # a loaded CI host still answers a few queries in a second
  assert s["sm_mhz_min"] == 1785.0 and s["sm_mhz_max"] == 1980.0
  assert s["reasons"] == {"software power cap": 1.0}
  assert 0.9 <= s["seconds"] < 10
  calls = fake_smi.read_text().splitlines()
  # one query to find the reasons' field, then one a sample, each answered and done
  assert len(calls) == s["samples"] + 1
  assert set(calls) == {"--id=3 --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,"
                        "clocks_event_reasons.active --format=csv,noheader,nounits"}
  # stopped: no more queries, and a second summary is the same
  time.sleep(0.1)
  assert len(fake_smi.read_text().splitlines()) == len(calls) and clocks.summary() == s


def test_older_driver_field_name(fake_smi, monkeypatch):
  monkeypatch.setenv("FAKE_SMI_REJECT", "clocks_event_reasons")
  with gpu_clocks.sampling(interval_ms=20) as clocks:
    time.sleep(0.5)
  s = clocks.summary()
  assert s.get("reasons") == {"idle": 1.0}, s
  calls = fake_smi.read_text().splitlines()
  assert "clocks_event_reasons.active" in calls[0]  # refused
  assert all("clocks_throttle_reasons.active" in c for c in calls[1:])


def test_a_refused_query_is_an_error_not_a_failure(fake_smi, monkeypatch):
  monkeypatch.setenv("FAKE_SMI_REJECT", "reasons.active")  # both names refused
  with gpu_clocks.sampling() as clocks:
    pass
  error = clocks.summary()["error"]
  assert error.startswith("nvidia-smi --query-gpu=clocks_throttle_reasons.active answered 2")
  assert "not a valid field" in error


def test_bad_interval():
  with pytest.raises(ValueError, match="interval_ms must be >= 1, got 0"):
    gpu_clocks.Sampler(interval_ms=0)
