"""bench/ab_trees.py with real subprocesses: two trees whose module differs, alternating rounds, medians."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
spec = importlib.util.spec_from_file_location("ab_trees", BENCH / "ab_trees.py")
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)

# The "benchmark": reads its tree's module (found through PYTHONPATH), writes its JSON, and logs which
# tree ran (FAST_XLSTM_COMMIT) so the test sees the order of the runs.
# A tree's third run reports ten times its value: an outlier the median must ignore.
PROBE = ("import abprobe, json, os, sys; name = os.environ['FAST_XLSTM_COMMIT']; "
         "seen = open(sys.argv[2]).read().split().count(name) if os.path.exists(sys.argv[2]) else 0; "
         "x = abprobe.VALUE * (10 if seen == 2 else 1); "
         "json.dump({'x': x, 'nested': [{'y': x * 2}], 'flag': True, 'tree': name}, "
         "open(sys.argv[1], 'w')); open(sys.argv[2], 'a').write(name + '\\n'); sys.exit(abprobe.RC)")


def _tree(root: Path, value: float, rc: int = 0) -> Path:
    root.mkdir()
    (root / "abprobe.py").write_text(f"VALUE = {value}\nRC = {rc}\n")
    return root


def test_alternates_trees_and_reports_medians(tmp_path, capsys):
    base, new = _tree(tmp_path / "base", 4.0), _tree(tmp_path / "new", 5.0)
    runs = tmp_path / "order.txt"
    out = tmp_path / "ab"
    assert ab.main(["--out", str(out), "--tree", f"base={base}", "--tree", f"new={new}", "--rounds", "3", "--",
                    sys.executable, "-c", PROBE, "{out}", str(runs)]) == 0
    assert runs.read_text().split() == ["base", "new", "new", "base", "base", "new"]
    r = json.loads((out / "ab.json").read_text())
    assert set(r["summary"]) == {"x", "nested.0.y"}  # booleans and strings are not numbers to compare
    assert r["summary"]["x"]["base"] == {"values": [4.0, 4.0, 40.0], "median": 4.0, "over_first": 1.0}
    assert r["summary"]["x"]["new"]["median"] == 5.0 and r["summary"]["x"]["new"]["over_first"] == 1.25
    assert r["summary"]["nested.0.y"]["new"]["median"] == 10.0
    assert (out / "new-2.json").exists() and (out / "base-0.log").exists()
    assert "x: base 4  new 5 (1.250x)" in capsys.readouterr().out
    assert ab.main(["--out", str(tmp_path / "ab2"), "--tree", f"base={base}", "--tree", f"new={new}", "--rounds", "1",
                    "--keys", r"^x$", "--", sys.executable, "-c", PROBE, "{out}", str(tmp_path / "order2.txt")]) == 0
    assert set(json.loads((tmp_path / "ab2" / "ab.json").read_text())["summary"]) == {"x"}


def test_stops_at_a_failing_run_and_names_its_log(tmp_path, capsys):
    base, bad = _tree(tmp_path / "base", 1.0), _tree(tmp_path / "bad", 1.0, rc=3)
    assert ab.main(["--out", str(tmp_path / "ab"), "--tree", f"base={base}", "--tree", f"bad={bad}", "--",
                    sys.executable, "-c", PROBE, "{out}", str(tmp_path / "order.txt")]) == 1
    assert "bad failed in round 0" in capsys.readouterr().err
    assert not (tmp_path / "ab" / "ab.json").exists()
    slow = _tree(tmp_path / "slow", 1.0)
    (slow / "abprobe.py").write_text("import time\ntime.sleep(30)\nVALUE = 1.0\nRC = 0\n")
    assert ab.main(["--out", str(tmp_path / "ab3"), "--tree", f"base={base}", "--tree", f"slow={slow}",
                    "--timeout", "2", "--", sys.executable, "-c", PROBE, "{out}", str(tmp_path / "order3.txt")]) == 1
    assert "slow ran past --timeout 2.0 s in round 0" in capsys.readouterr().err


def test_rejects_bad_arguments(tmp_path):
    base = _tree(tmp_path / "base", 1.0)
    cmd = ["--", sys.executable, "-c", "pass", "{out}"]
    for argv in (["--tree", f"base={base}", *cmd],                                   # one tree
                 ["--tree", f"base={base}", "--tree", f"base={base}", *cmd],         # same name twice
                 ["--tree", f"a={base}", "--tree", f"b={base}", "--", sys.executable, "-c", "pass"],  # no {out}
                 ["--tree", f"a={base}", "--tree", f"b={tmp_path / 'missing'}", *cmd],  # not a directory
                 ["--tree", "nameless", "--tree", f"b={base}", *cmd],
                 ["--tree", f"a={base}", "--tree", f"b={base}", "--rounds", "0", *cmd]):
        with pytest.raises(SystemExit):
            ab.main(["--out", str(tmp_path / "x"), *argv])
