"""`fast-xlstm` command line: generate, chat, info, convert."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _err(msg: str) -> None:
    print(f"[fast-xlstm] {msg}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    from .loading import load

    loaded = load(args.model, device=args.device, dtype=args.dtype)
    if loaded.random_weights:
        _err(f"no trained model given (--model): using {loaded.source}; its text is noise")
    else:
        _err(f"loaded {loaded.source} ({loaded.model.num_parameters() / 1e6:.1f}M parameters, "
             f"{loaded.model.dtype}, {loaded.model.device})")
    return loaded


def _sampling(args: argparse.Namespace):
    from .generation.params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          stop=args.stop or [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation.generate import stream_generate

    loaded = _load(args)
    params = _sampling(args)
    device = loaded.model.device
    t0 = time.perf_counter()
    t_first = None
    n = 0
    outputs: list = []
    for event in stream_generate(loaded.model, loaded.tokenizer, args.prompt, params, outputs=outputs):
        if t_first is None:
            _sync(device)
            t_first = time.perf_counter()
        n += 1
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    _sync(device)
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    prompt_len = len(outputs[0].prompt_token_ids)
    decode_rate = (n - 1) / (t1 - t_first) if n > 1 and t1 > t_first else float("nan")
    _err(f"prompt {prompt_len} tokens, first token after {1e3 * (t_first - t0):.1f} ms; generated {n} tokens "
         f"in {t1 - t0:.2f} s ({decode_rate:.1f} tok/s decode); finish: {outputs[0].finish_reason}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generation.chat import ChatSession

    loaded = _load(args)
    session = ChatSession(loaded.model, loaded.tokenizer, _sampling(args), system=args.system)
    _err("chat: type a message and press enter; /reset starts over, /exit (or end of input) quits")
    for line in sys.stdin:
        message = line.rstrip("\n")
        if message.strip() in ("/exit", "/quit"):
            break
        if message.strip() == "/reset":
            session.reset()
            _err("conversation reset")
            continue
        if not message.strip():
            continue
        sys.stdout.write("assistant: ")
        t0 = time.perf_counter()
        for delta in session.send(message):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        _err(f"turn {session.turns}: prefilled {session.last_prefill_tokens} new tokens "
             f"(history {session.history_tokens} tokens, never re-read), {session.last_generated_tokens} "
             f"generated in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import PRESETS, XLSTMConfig, get_preset
    from .model.weights import checkpoint_files

    source = Path(args.model)
    if source.is_dir():
        layout, files = checkpoint_files(source)
        cfg = XLSTMConfig.from_file(source / ("config.json" if layout == "hub" else "config.yaml"))
        where = {"path": str(source), "layout": layout, "weight_files": [f.name for f in files],
                 "weight_bytes": sum(f.stat().st_size for f in files),
                 "tokenizer": (source / "tokenizer.json").exists()}
    elif args.model in PRESETS:
        cfg, where = get_preset(args.model), {"preset": args.model}
    else:
        raise ValueError(f"{args.model!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    per_seq = cfg.state_numel_per_sequence()
    info = {
        **where,
        "parameters": cfg.num_parameters(),
        "blocks": cfg.num_blocks, "embedding_dim": cfg.embedding_dim, "heads": cfg.num_heads,
        "qk_head_dim": cfg.qk_head_dim, "v_head_dim": cfg.v_head_dim, "ffn_dim": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "state_bytes_per_sequence": {"float32": per_seq * 4, "bfloat16": per_seq * 2},
        "stop_token_ids": cfg.stop_token_ids,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("architectures",)},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "preset", "layout", "weight_files", "weight_bytes", "tokenizer"):
        if key in info:
            print(f"{key:>26}: {info[key]}")
    print(f"{'parameters':>26}: {info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)")
    print(f"{'shape':>26}: {cfg.num_blocks} blocks x d={cfg.embedding_dim}, {cfg.num_heads} heads "
          f"(qk {cfg.qk_head_dim}, v {cfg.v_head_dim}), FFN {cfg.ffn_dim}, vocab {cfg.vocab_size}")
    print(f"{'state per sequence':>26}: {per_seq * 4 / 1e6:.2f} MB fp32, {per_seq * 2 / 1e6:.2f} MB bf16 "
          f"(constant in sequence length)")
    print(f"{'stop token ids':>26}: {cfg.stop_token_ids}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .model import XLSTMForCausalLM
    from .model.weights import checkpoint_files

    src, dst = Path(args.src), Path(args.dst)
    layout_in, _ = checkpoint_files(src)
    layout = args.layout or ("xlstm" if layout_in == "hub" else "hub")
    if dst.exists() and any(dst.iterdir()) and not args.overwrite:
        raise ValueError(f"{dst} exists and is not empty (pass --overwrite to write into it)")
    model = XLSTMForCausalLM.from_pretrained(src, dtype=args.dtype, device="cpu")
    model.save_pretrained(dst, layout=layout, max_shard_size=args.max_shard_size)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    _err(f"wrote {layout} layout ({model.dtype}) to {dst}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or preset (default: the bundled Shakespeare model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast-xlstm", description="Run, chat with and inspect xLSTM models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion of PROMPT to stdout (speed to stderr)")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat that keeps the recurrent state between turns")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=256)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config, parameter count and state size of a checkpoint or preset")
    p.add_argument("model", help="checkpoint directory or preset name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert between the hub layout and the xlstm package layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: keep)")
    p.add_argument("--layout", choices=("hub", "xlstm"), default=None, help="default: the other one")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    from .bench.cli import register as register_bench

    register_bench(sub)
    from .server.cli import register as register_serve

    register_serve(sub)
    from .training.cli import register as register_training

    register_training(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        _err(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
