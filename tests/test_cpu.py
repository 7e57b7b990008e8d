"""Host facts (worker/host.py, checked against this host's /proc/cpuinfo and lscpu), cpu lists,
and the measured limits of tuning/cpu.py (shapes of the report, never timings)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import tuning.cpu as cpu_mod
import worker.host as host_mod
from tuning.cpu import measure_limits
from worker.host import ISA_FLAGS, cpu_facts, format_cpu_list, parse_cpu_list, parse_cpuinfo

# --- cpu lists --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, cpus",
    [
        ("0-3,8", (0, 1, 2, 3, 8)),
        ("5", (5,)),
        (" 1 , 3-4 ", (1, 3, 4)),
        ("2-2", (2,)),
        ("8,0-1,1", (0, 1, 8)),
        ("0-1\n", (0, 1)),  # as /sys/.../cpulist ends
    ],
)
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    "text", ["", " ", "3-1", "a", "-1", "1-", "-", "1,,2", "0-3,", "0-7:2", "1.5", "+1", "0--2"]
)
def test_parse_cpu_list_refuses(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


@pytest.mark.parametrize("cpus", [(0,), (0, 1, 2, 3, 8), (1, 3, 5), (0, 1, 4, 5, 6, 9)])
def test_format_cpu_list_round_trips(cpus):
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert format_cpu_list((0, 1, 2, 3, 8)) == "0-3,8"


# --- /proc/cpuinfo parsing --------------------------------------------------------------------

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

"""


def test_parse_cpuinfo_synthetic():
    info = parse_cpuinfo(CPUINFO)
    assert info["vendor"] == "GenuineIntel"
    assert info["model_name"].startswith("Intel(R) Xeon(R) Platinum")
    assert (info["family"], info["model"]) == (6, 143)
    assert {"amx_tile", "avx512_bf16"} <= info["flags"]
    assert info["physical_cores"] == 1  # two hyperthreads of one core


def test_parse_cpuinfo_of_nothing():
    info = parse_cpuinfo("")
    assert info["flags"] == set() and info["vendor"] is None and info["physical_cores"] is None


# --- this host --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts():
    return cpu_facts()


def proc_cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_isa_flags_match_proc_cpuinfo(facts):
    flags = proc_cpuinfo_flags()
    assert facts["isa"] == {f: f in flags for f in ISA_FLAGS}
    assert facts["native_bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="no lscpu")
def test_isa_flags_match_lscpu(facts):
    out = subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}
    ).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields["Flags"].split())
    for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"):
        assert facts["isa"][flag] == (flag in flags), flag
    assert facts["vendor"] == fields["Vendor ID"].strip()
    assert facts["logical_cpus"] == int(fields["CPU(s)"])


def test_counts_and_torch(facts):
    assert facts["usable_cpus"] == len(os.sched_getaffinity(0))
    assert parse_cpu_list(facts["usable_cpu_list"]) == tuple(sorted(os.sched_getaffinity(0)))
    assert facts["logical_cpus"] == os.cpu_count() >= facts["usable_cpus"] >= 1
    assert facts["physical_cores"] is None or 1 <= facts["physical_cores"] <= os.cpu_count()
    assert facts["torch_version"] == torch.__version__
    assert facts["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["torch_threads"] == torch.get_num_threads()
    assert isinstance(facts["ipex_available"], bool)
    if Path("/sys/devices/system/node/node0").exists():
        assert facts["numa_nodes"][0]["id"] == 0 and facts["numa_nodes"][0]["cpus"]


def test_facts_are_json_ready(facts):
    assert json.loads(json.dumps(facts)) == facts


def test_facts_without_proc_or_sys(monkeypatch):
    monkeypatch.setattr(host_mod, "_read", lambda path: None)
    facts = cpu_facts()
    assert facts["vendor"] is None and not any(facts["isa"].values())
    assert facts["native_bf16"] is False and facts["llc_bytes"] is None
    assert facts["usable_cpus"] >= 1 and facts["torch_version"] == torch.__version__


# --- measured limits --------------------------------------------------------------------------


def test_measure_limits_tiny_budget_gives_positive_numbers():
    before = torch.get_num_threads()
    limits = measure_limits(1, 0.05, gemv_mb=4, gemm_shape=(64, 64, 64), bf16=True)
    assert limits["gemv_fp32_gbs"] > 0 and limits["gemm_fp32_gflops"] > 0
    assert limits["gemm_bf16_gflops"] > 0
    assert limits["gemv_bytes"] == 4 << 20 and limits["gemm_shape"] == [64, 64, 64]
    assert limits["gemv_reps"] >= 3
    assert torch.get_num_threads() == before
    no_bf16 = measure_limits(1, 0.01, gemv_mb=1, gemm_shape=(32, 32, 32), bf16=False)
    assert no_bf16["gemm_bf16_gflops"] is None


def test_measure_limits_refuses_zero_threads():
    with pytest.raises(ValueError):
        measure_limits(0, 0.01)


def test_cli_json(capsys):
    assert cpu_mod.main(["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "isa" in out and "limits" not in out


def test_cli_table(capsys):
    assert cpu_mod.main([]) == 0
    out = capsys.readouterr().out
    assert "usable_cpus" in out and "isa" in out


@pytest.mark.slow
def test_measure_limits_on_this_host():
    facts = cpu_facts()
    limits = measure_limits(facts["usable_cpus"])
    assert limits["gemv_bytes"] >= 256 << 20
    assert limits["gemv_fp32_gbs"] > 1 and limits["gemm_fp32_gflops"] > 5
    assert (limits["gemm_bf16_gflops"] is not None) == facts["native_bf16"]
