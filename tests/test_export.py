"""``python -m tuning.export``: the registry of exporters (flow, hift), the default (all of
them, in order), ``--only``, and the progress / path lines. The graphs here are stand-ins
(the exporters are replaced): tests/test_ort_flow.py and tests/test_ort_hift.py export the
real ones."""

from __future__ import annotations

import pytest

from tuning.export import EXPORTERS, main
from worker.ort import export_dir


@pytest.fixture
def fake_exports(monkeypatch) -> list[str]:
    """Both stages' exporters write a few bytes instead of a graph; the list gets, per call,
    the stage and the exported model's class."""
    calls: list[str] = []

    def fake(stage):
        def export(model, path, **kwargs):
            calls.append(f"{stage} {type(model).__name__}")
            path.write_bytes(b"graph")
            return path

        return export

    monkeypatch.setattr("worker.ort_flow.export_dit_step", fake("flow"))
    monkeypatch.setattr("worker.ort_hift.export_hift_step", fake("hift"))
    return calls


def test_every_stage_is_registered():
    assert list(EXPORTERS) == ["flow", "hift"]


def test_the_default_exports_every_stage_then_reuses_them(tiny_dir, tmp_path, fake_exports, capsys):
    argv = ["--model-dir", str(tiny_dir), "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    assert fake_exports == ["flow DiT", "hift HiFTGenerator", "hift HiFTGenerator"]
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["flow", "hift", "hift"]
    paths = [line.split(": ", 1)[1] for line in lines]
    assert all(p.startswith(f"{export_dir(tmp_path)}/") for p in paths)
    assert [p.rsplit("/", 1)[1].split("-")[:2] for p in paths[1:]] == [
        ["hift", "step"],
        ["hift", "final"],
    ]
    err = out.err.splitlines()
    assert f"hift: loading the hift of {tiny_dir} ..." in err
    assert sum(line.startswith("hift: exporting hift-") for line in err) == 2
    assert [line.split(" ", 3)[:3] for line in err if "ready in" in line] == [
        ["flow:", "ready", "in"],
        ["hift:", "ready", "in"],
    ]

    fake_exports.clear()  # cached now: nothing exported or loaded again
    assert main(argv) == 0
    assert fake_exports == []
    out = capsys.readouterr()
    assert out.out.splitlines() == lines
    assert not any("loading" in line for line in out.err.splitlines())


def test_only_hift(tiny_dir, tmp_path, fake_exports, capsys):
    argv = ["--model-dir", str(tiny_dir), "--cache-dir", str(tmp_path), "--only", "hift"]
    assert main(argv) == 0
    assert fake_exports == ["hift HiFTGenerator", "hift HiFTGenerator"]
    assert [line.split(": ")[0] for line in capsys.readouterr().out.splitlines()] == ["hift"] * 2


def test_an_unknown_stage_is_refused(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model-dir", str(tiny_dir), "--cache-dir", str(tmp_path), "--only", "llm"])
    assert e.value.code == 2
    assert "invalid choice: 'llm'" in capsys.readouterr().err
