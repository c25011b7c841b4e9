"""`fast-xlstm bench`: ours vs the official `xlstm` package, in one run on the current device."""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import subprocess
import sys
from pathlib import Path

import torch

from ..config import PRESETS, get_preset
from ..model import XLSTMForCausalLM
from ..model.weights import parse_dtype
from .report import write
from .stacks import OfficialStack, OursStack
from .suite import SECTIONS, SuiteSizes, run_suite
from .timing import device_name

logger = logging.getLogger(__name__)


def _commit() -> str:
    """The git commit, or $FAST_XLSTM_COMMIT where the tree travelled without .git (GPU machines)."""
    import os

    if os.environ.get("FAST_XLSTM_COMMIT"):
        return os.environ["FAST_XLSTM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _backend_name(model: XLSTMForCausalLM) -> str:
    from ..ops import resolve_backend

    return resolve_backend(model.lm_head.weight).name


def _model(args: argparse.Namespace, device: str, dtype: torch.dtype) -> XLSTMForCausalLM:
    if Path(args.model).is_dir():
        return XLSTMForCausalLM.from_pretrained(args.model, dtype=dtype, device=device, fuse=True)
    if args.model not in PRESETS:
        raise ValueError(f"--model {args.model!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    return XLSTMForCausalLM.from_config(get_preset(args.model), dtype=dtype, device=device, init="7b",
                                        seed=0).fuse_projections()


def cmd_bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    state_dtype = parse_dtype(args.state_dtype)
    sizes = SuiteSizes.quick() if args.quick else SuiteSizes()
    if args.compile is None:
        args.compile = device.startswith("cuda")
    if args.max_batch:
        sizes.decode_batches = [b for b in sizes.decode_batches if b <= args.max_batch]
    for name in ("ttft_prompts", "decode_prompts", "decode_batches", "memory_lengths"):
        if getattr(args, name):
            setattr(sizes, name, [int(x) for x in getattr(args, name).split(",")])
    if args.decode_steps:
        sizes.decode_steps = args.decode_steps
    sections = tuple(args.sections.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    model = _model(args, device, dtype)
    meta = {"model": args.model, "device": device_name(model.device), "commit": _commit(), "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "state_dtype": str(state_dtype).removeprefix("torch."),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "parameters": model.num_parameters(), "sizes": vars(sizes), "compile_decode": args.compile,
            "mlstm_backend": _backend_name(model)}
    results: dict[str, dict] = {}
    stacks = {"ours": OursStack, "official": OfficialStack}
    for stack_name in args.stacks.split(","):
        if stack_name not in stacks:
            raise ValueError(f"unknown stack {stack_name!r}; use ours, official")
    for stack_name in args.stacks.split(","):
        cls = stacks[stack_name]
        opts = {"state_dtype": state_dtype, "compile_decode": args.compile}
        try:
            cls(model, max_batch=1, **opts)
        except ImportError as exc:
            logger.warning("%s stack skipped: %s (install the dev extra)", stack_name, exc)
            continue
        results[cls.name] = run_suite(lambda b, cls=cls: cls(model, max_batch=b, **opts), model, sizes, state_dtype,
                                      sections)
        gc.collect()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    files = write(Path(args.out), meta, results)
    print((Path(args.out) / "bench.md").read_text())
    logger.info("wrote %s", ", ".join(str(f) for f in files))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure ours against the official xlstm package on this device")
    p.add_argument("--model", default="xlstm-7b", help="preset (random weights) or checkpoint dir (default xlstm-7b)")
    p.add_argument("--stacks", default="ours,official", help="comma list of: ours, official")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="weights (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--state-dtype", default="float32", help="recurrent state: float32 or bfloat16")
    p.add_argument("--max-batch", type=int, default=None, help="largest decode batch to measure")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our decode step (default: on for CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, numbers meaningless")
    for name, what in (("ttft-prompts", "prompt lengths for time to first token"),
                       ("decode-prompts", "prompt lengths before batch-1 decode"),
                       ("decode-batches", "batch sizes for decode throughput"),
                       ("memory-lengths", "generated lengths at which peak memory is read")):
        p.add_argument(f"--{name}", default=None, help=f"comma list: {what}")
    p.add_argument("--decode-steps", type=int, default=None, help="decode steps timed per point")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of measurements to run")
    p.add_argument("--out", default="bench/results/latest")
    p.set_defaults(func=cmd_bench)
