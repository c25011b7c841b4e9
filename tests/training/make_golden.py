"""Writes tests/training/golden/tiny_losses.json: the golden run's per-step loss and grad norm.

    .venv/bin/python tests/training/make_golden.py

Run it only when a change is meant to alter the training numbers (say why in the commit).
test_golden.py trains the same config and compares with the tolerance stored in the file.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for trainutil

import torch  # noqa: E402

from trainutil import GOLDEN, golden_config, prepare_tiny_data, run_in_process, step_records, write_txt_corpus  # noqa: E402,E501

TOLERANCE = {"loss_abs": 5e-4, "grad_norm_rel": 5e-3}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_tiny_data(tmp / "prepared", [write_txt_corpus(tmp / "corpus.txt")])
        cfg = golden_config(tmp / "prepared", tmp / "run")
        assert run_in_process(cfg) == 0
        records = step_records(tmp / "run")
    steps = sorted(records)
    out = {
        "about": "tiny golden run (tests/trainutil.golden_config), CPU fp32, 1 thread; regenerate with "
                 "`.venv/bin/python tests/training/make_golden.py`",
        "torch": torch.__version__,
        "tolerance": TOLERANCE,
        "steps": steps,
        "loss": [records[s]["loss"] for s in steps],
        "grad_norm": [records[s]["grad_norm"] for s in steps],
        "lr": [records[s]["lr"] for s in steps],
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: loss {out['loss'][0]:.4f} -> {out['loss'][-1]:.4f} over {len(steps)} steps")


if __name__ == "__main__":
    main()
