"""A/B of source trees in one run, alternating: the same benchmark command for each tree, round after
round, each tree first in every other round, then the median of every number per tree.

Wall-clock figures of one tree move 2-3% between processes on one H100 (e.g. the decode step and the
64-token graph prefill in bench/results/h100-7b-few-rows/epilogues-612f6fd), as much as many changes
are worth. Running the trees alternately in one run, and comparing medians, keeps a drift of the
machine (clocks, temperature, other tenants) from landing on one tree.

The command gets `{out}` replaced by a JSON path per tree and round, and runs with the tree first on
PYTHONPATH (so `import fast_xlstm` takes that tree) and FAST_XLSTM_COMMIT set to the tree's name:

    python bench/ab_trees.py --out DIR --tree new=src --tree base=/tmp/base/src --rounds 3 \\
        --keys 'ms' -- python bench/profile_decode.py --batches 64 --prefill 64 --out {out}

Writes DIR/NAME-ROUND.json (the command's), DIR/NAME-ROUND.log (its output) and DIR/ab.json: per
numeric leaf of the JSONs (paths such as `decode.0.ms_per_step`) matching --keys, every tree's values,
median, and its median over the first tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path


def numeric_leaves(obj, prefix: str = "") -> dict[str, float]:
    """Flattens a JSON value to {dotted path: number} (bools and non-numbers left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):
            out[prefix] = float(obj)
        return out
    for k, v in items:
        out.update(numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def parse_tree(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path or not re.fullmatch(r"[\w.-]+", name):
        raise argparse.ArgumentTypeError(f"a tree is NAME=PATH (NAME of letters, digits, ._-), got {text!r}")
    p = Path(path).resolve()
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"tree {name!r}: {p} is not a directory")
    return name, p


def order(names: list[str], rnd: int) -> list[str]:
    """The trees' order in round `rnd`: as given in even rounds, reversed in odd ones."""
    return names if rnd % 2 == 0 else names[::-1]


def summarize(values: dict[str, dict[str, list[float]]], names: list[str], keys: str) -> dict:
    """{path: {tree: {values, median, over_first}}} for the paths every tree produced in every round."""
    pattern = re.compile(keys)
    common = set.intersection(*(set(values[n]) for n in names))
    out: dict = {}
    for path in sorted(common):
        if not pattern.search(path):
            continue
        first = statistics.median(values[names[0]][path])
        out[path] = {n: {"values": values[n][path], "median": statistics.median(values[n][path]),
                         "over_first": (statistics.median(values[n][path]) / first) if first else None}
                     for n in names}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tree", type=parse_tree, action="append", required=True,
                    help="NAME=PATH of a tree's import root (a src/ folder), at least two, the first the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keys", default=".", help="regular expression: summarize only paths it matches")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per command run")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, with {out} for its JSON")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    names = [n for n, _ in args.tree]
    if len(names) < 2 or len(set(names)) != len(names):
        ap.error(f"give at least two trees with distinct names, got {names}")
    if not command or not any("{out}" in c for c in command):
        ap.error("the command (after --) must contain {out}, where it writes its JSON")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roots = dict(args.tree)
    values: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    runs = []
    for rnd in range(args.rounds):
        for name in order(names, rnd):
            path = out / f"{name}-{rnd}.json"
            env = dict(os.environ, FAST_XLSTM_COMMIT=name,
                       PYTHONPATH=os.pathsep.join([str(roots[name]), *filter(None, [os.environ.get("PYTHONPATH")])]))
            cmd = [c.replace("{out}", str(path)) for c in command]
            with open(out / f"{name}-{rnd}.log", "w") as log:
                try:
                    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=args.timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            runs.append({"round": rnd, "tree": name, "rc": rc})
            print(f"[ab_trees] round {rnd} {name}: rc {rc}", flush=True)
            if rc != 0:
                why = f"ran past --timeout {args.timeout} s" if rc == "timeout" else "failed"
                print(f"[ab_trees] {name} {why} in round {rnd}: see {out / f'{name}-{rnd}.log'}", file=sys.stderr)
                return 1
            for k, v in numeric_leaves(json.loads(path.read_text())).items():
                values[name].setdefault(k, []).append(v)
    result = {"trees": {n: str(p) for n, p in args.tree}, "command": command, "rounds": args.rounds, "runs": runs,
              "summary": summarize(values, names, args.keys)}
    (out / "ab.json").write_text(json.dumps(result, indent=2) + "\n")
    for path, per in result["summary"].items():
        cells = "  ".join(f"{n} {per[n]['median']:.4g}" + ("" if n == names[0] else f" ({per[n]['over_first']:.3f}x)")
                          for n in names)
        print(f"{path}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
