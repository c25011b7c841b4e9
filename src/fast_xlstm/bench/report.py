"""Benchmark results as JSON, a markdown table and PNG plots like the paper's figures."""

from __future__ import annotations

import json
from pathlib import Path


def _ratio(ours: float | None, theirs: float | None, higher_is_better: bool) -> str:
    if not ours or not theirs:
        return "-"
    return f"{(ours / theirs) if higher_is_better else (theirs / ours):.2f}x"


def _rows(results: dict, section: str, key: str) -> dict:
    return {r[key]: r for r in results.get(section, []) if "error" not in r}


def markdown(meta: dict, results: dict[str, dict]) -> str:
    """Tables of ours vs the official stack (ratios: how many times better ours is)."""
    names = list(results)
    ours, ref = results[names[0]], results[names[1]] if len(names) > 1 else {}
    lines = [f"# fast-xlstm bench: {meta['model']} on {meta['device']}", "",
             f"commit {meta['commit']}, torch {meta['torch']}, weights {meta['dtype']}, state {meta['state_dtype']}, "
             f"{meta['date']}", ""]

    def table(title: str, section: str, key: str, metric: str, unit: str, higher: bool,
              extra: tuple[str, str] | None = None):
        a, b = _rows(ours, section, key), _rows(ref, section, key)
        if not a:  # a section this run skipped
            return
        head = f"| {key} | {names[0]} {unit} |" + (f" {names[0]} {extra[1]} |" if extra else "") + \
            (f" {names[1]} {unit} | ratio |" if ref else "")
        lines.extend([f"## {title}", "", head, "|" + "---|" * (head.count("|") - 1)])
        for k in a:
            row = f"| {k} | {a[k][metric]:,.1f} |" + (f" {a[k].get(extra[0], 0):,.1f} |" if extra else "")
            if ref:
                theirs = b.get(k, {}).get(metric)
                row += f" {theirs:,.1f} | {_ratio(a[k][metric], theirs, higher)} |" if theirs else " - | - |"
            lines.append(row)
        lines.append("")

    table("Time to first token, batch 1", "ttft", "prompt", "ms", "ms", False, ("tflops", "TFLOP/s"))
    table("Decode at batch 1 after a prompt", "decode_after_prompt", "prompt", "tok_s", "tok/s", True, ("gb_s", "GB/s"))
    table("Decode throughput by batch size", "decode_batch", "batch", "tok_s", "tok/s", True, ("gb_s", "GB/s"))
    table("Prefill throughput, 65,536 tokens per forward", "prefill", "context", "tok_s", "tok/s", True,
          ("tflops", "TFLOP/s"))
    table("Peak memory while generating (batch 1)", "memory", "generated", "peak_gb", "GB", False)
    return "\n".join(lines)


def plots(results: dict[str, dict], out_dir: Path) -> list[Path]:
    """One PNG per measurement, every stack on the same axes. Needs matplotlib (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    specs = [("ttft", "prompt", "ms", "prompt tokens", "time to first token (ms)"),
             ("decode_after_prompt", "prompt", "tok_s", "prompt tokens", "decode tok/s (batch 1)"),
             ("decode_batch", "batch", "tok_s", "batch size", "decode tok/s"),
             ("prefill", "context", "tok_s", "context (65,536 tokens per forward)", "prefill tok/s"),
             ("memory", "generated", "peak_gb", "generated tokens", "peak GPU memory (GB)")]
    files = []
    for section, x, y, xlabel, ylabel in specs:
        if not any(res.get(section) for res in results.values()):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, res in results.items():
            rows = [r for r in res.get(section, []) if "error" not in r]
            ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{section}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


def write(out_dir: Path, meta: dict, results: dict[str, dict]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out_dir / "bench.md").write_text(markdown(meta, results) + "\n")
    return [out_dir / "bench.json", out_dir / "bench.md", *plots(results, out_dir)]


def script_result(benchmark: str, model: str, device: str, **fields: object) -> dict:
    """The header every bench/ script's JSON starts with: what ran, at which commit ($FAST_XLSTM_COMMIT),
    on which card and torch; then `fields`."""
    import os

    import torch

    from .timing import device_name

    return {"benchmark": benchmark, "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"), "model": model,
            "device": device_name(torch.device(device)), "torch": torch.__version__, **fields}


def save_json(path: str | Path | None, result: dict) -> None:
    """Writes `result` as indented JSON to `path` (parents made); nothing when path is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
