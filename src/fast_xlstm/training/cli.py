"""The training commands: `prepare-data`, `train`, `export`.

`register(subparsers)` adds them to the `fast-xlstm` parser (`fast_xlstm.cli`). Each command returns an exit code: 0 ok, 2 bad input, 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _err(msg: str) -> None:
    print(f"[fast-xlstm] {msg}", file=sys.stderr, flush=True)


def _guard(fn):
    """Missing optional packages end like bad input: a message and exit status 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ImportError as exc:
            _err(f"error: {exc}")
            return 2
    return run


@_guard
def cmd_prepare_data(args: argparse.Namespace) -> int:
    from .prepare import PrepareOptions, prepare_data

    opts = PrepareOptions(inputs=args.input, tokenizer=args.tokenizer, output=args.output, chat=args.chat,
                          text_field=args.text_field, messages_field=args.messages_field, txt_split=args.txt_split,
                          val_fraction=args.val_fraction, seed=args.seed, num_workers=args.num_workers,
                          shard_tokens=args.shard_tokens, overwrite=args.overwrite,
                          progress=not args.no_progress)
    summary = prepare_data(opts)
    splits = ", ".join(f"{name}: {summary[name]['documents']:,} documents, {summary[name]['tokens']:,} tokens"
                       for name in ("train", "val") if name in summary)
    _err(f"wrote {args.output} ({splits})")
    return 0


@_guard
def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .train import run

    return run(TrainConfig.load(args.config, args.overrides))


@_guard
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    dst = export_checkpoint(args.checkpoint, args.dst, dtype=args.dtype, tokenizer=args.tokenizer,
                            layout=args.layout, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    _err(f"wrote {args.layout} layout to {dst}")
    return 0


class _OverridesParser(argparse.ArgumentParser):
    """Collects unknown `--section.key=value` arguments into `overrides` instead of failing, so the
    parent parser (which never sees them) accepts the command line."""

    def parse_known_args(self, args: Any = None, namespace: Any = None):  # type: ignore[override]
        ns, extra = super().parse_known_args(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + list(extra)
        return ns, []


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds prepare-data, train and export to a `fast-xlstm` subparsers action."""
    p = subparsers.add_parser("prepare-data", help="tokenize .txt/.jsonl/.parquet files into token shards",
                              description="Tokenizes documents into uint16/uint32 shards with document "
                                          "boundaries (every document starts with id 0), in parallel; the output "
                                          "bytes do not depend on --num-workers.")
    p.add_argument("--input", nargs="+", required=True, help="files or directories (.txt, .jsonl, .json, .parquet)")
    p.add_argument("--tokenizer", required=True, help="dir with tokenizer.json (or the file)")
    p.add_argument("--output", required=True, help="output dir: train/, val/, tokenizer/, prepare.json")
    p.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text (default: text)")
    p.add_argument("--chat", action="store_true",
                   help="records are chats ({messages: [{role, content}]}): loss only on assistant replies")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--txt-split", choices=("file", "line", "blank"), default="file",
                   help=".txt documents: a whole file, each line, or blank-line separated paragraphs")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents for val/ (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-tokens", type=int, default=2**28, help="tokens per shard file (about)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare_data)

    p = subparsers.add_parser("train", help="pretrain or fine-tune (one process, or under torchrun)",
                              description="Trains per a YAML config; override any key with --section.key=value. "
                                          "Many GPUs: torchrun --nproc-per-node G -m fast_xlstm.training.train "
                                          "--config FILE ...",)
    p.__class__ = _OverridesParser
    p.add_argument("--config", default=None, help="training config YAML (see configs/)")
    p.set_defaults(func=cmd_train, overrides=[])

    p = subparsers.add_parser("export", help="training checkpoint -> hub-layout model dir (from_pretrained)")
    p.add_argument("checkpoint", help="a step-* checkpoint dir, or the checkpoints dir (newest)")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32, as trained)")
    p.add_argument("--tokenizer", default=None, help="dir with tokenizer.json (default: the run's copy)")
    p.add_argument("--layout", choices=("hub", "xlstm"), default="hub")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)
