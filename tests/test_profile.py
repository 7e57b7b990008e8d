"""``run.sh profile``: a real 3 s session at tiny dims (py-spy on the server and every stage),
the one-line explanation when py-spy may not attach, and the summary / flamegraph helpers."""

from __future__ import annotations

import re
import shutil

from tests.conftest import REPO
from tests.test_run_sh import assert_one_line_error, clean_env, run_sh
from tuning import profile

PROCESSES = ("server", "llm", "flow", "hift")


def test_profile_tiny_writes_summary_and_flamegraphs(tmp_path):
    cwd = tmp_path / "caller"
    cwd.mkdir()
    r = run_sh("profile", "--seconds", "3", "--dims", "tiny", cwd=cwd, env=clean_env(tmp_path),
               timeout=300)  # fmt: skip
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    if r.returncode != 0:  # py-spy may not attach here (no ptrace permission): say why, clearly
        last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
        assert "ptrace" in last and "SYS_PTRACE" in last and "ptrace_scope" in last, text
        return
    m = re.search(r"^profile folder: (.+)$", r.stdout, re.M)
    assert m, r.stdout
    out = (cwd / m.group(1)).resolve()
    try:
        assert out.parent == REPO / ".cache" / "profiles"  # the default: never the cwd
        assert list(cwd.iterdir()) == []
        summary = (out / "summary.txt").read_text()
        for name in PROCESSES:
            svg = (out / f"{name}.svg").read_text()
            assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
            assert (out / f"{name}.collapsed.txt").is_file()
            head = re.search(rf"^== {name} \(pid \d+, [^)]*\): (\d+) samples", summary, re.M)
            assert head, summary
        assert int(re.search(r"^== flow .*: (\d+) samples", summary, re.M).group(1)) > 0
        assert re.search(r"^\s+\d+\.\d% +\d+\.\d% +\d+  \S", summary, re.M), summary
        assert (out / "stats.json").is_file() and (out / "server.log").is_file()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_profile_explains_a_ptrace_refusal(tmp_path):
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\necho 'Error: Permission Denied (os error 13)' >&2\nexit 1\n")
    fake.chmod(0o755)
    model_dir = tmp_path / "m"  # never reached: py-spy is checked before the service starts
    r = run_sh("profile", "--seconds", "3", "--dims", "tiny", "--out", str(tmp_path / "p"),
               cwd=tmp_path, env=clean_env(tmp_path, PY_SPY=str(fake)), timeout=120)  # fmt: skip
    line = assert_one_line_error(r, "ptrace", "SYS_PTRACE", "kernel.yama.ptrace_scope=0")
    assert line.startswith("run.sh profile:")
    assert not model_dir.exists() and not (tmp_path / "p").exists()


def test_profile_without_py_spy_is_one_line(tmp_path):
    env = clean_env(tmp_path, PY_SPY=str(tmp_path / "no-such-py-spy"))
    r = run_sh("profile", "--dims", "tiny", cwd=tmp_path, env=env, timeout=120)
    assert_one_line_error(r, "cannot run py-spy")


# ---------------------------------------------------------------------------------------------
# helpers

RAW = """\
_start (libc.so.6);main (worker/x.py:10);work (worker/x.py:20) 30
_start (libc.so.6);main (worker/x.py:10);work (worker/x.py:21) 10
_start (libc.so.6);main (worker/x.py:10);at::native::add<float, int> (libtorch_cpu.so) 40
_start (libc.so.6);main (worker/x.py:11);0x7f30fc44524a (libgomp.so.1) 20
not a stack line
"""


def test_top_functions_counts_self_samples_per_function():
    stacks = profile.parse_collapsed(RAW)
    total, rows = profile.top_functions(stacks)
    assert total == 100
    assert ("at::native::add<float, int> (libtorch_cpu.so)", 40, 40) in rows[:2]
    assert ("work (worker/x.py)", 40, 40) in rows  # two lines of one function: one row
    assert ("[libgomp.so.1]", 20, 20) in rows
    text = profile.format_top("flow", 123, True, stacks)
    assert "== flow (pid 123, python + native frames): 100 samples" in text
    assert " 40.0% " in text and "at::native::add<...> (libtorch_cpu.so)" in text
    assert "[OpenMP]" in text
    assert "no samples" in profile.format_top("server", 1, False, [])


def test_flamegraph_svg_is_wellformed():
    import xml.etree.ElementTree as ET

    svg = profile.flamegraph_svg(profile.parse_collapsed(RAW), "flow <x>", "sub & title")
    root = ET.fromstring(svg)
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert "all: 100 samples (100.00%)" in titles
    assert any(t.startswith("work (worker/x.py): 40 samples") for t in titles)
    ET.fromstring(profile.flamegraph_svg([], "idle", ""))


def test_spy_failure_lines():
    assert "SYS_PTRACE" in profile.spy_failure("Error: Operation not permitted (os error 1)", 7)
    line = profile.spy_failure("Error: Failed to find python version\n  0: backtrace", 7)
    assert line == "py-spy failed on pid 7: Error: Failed to find python version"

