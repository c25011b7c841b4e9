"""The training loop, and the entry point for one process and for torchrun:

    fast-xlstm train --config configs/tiny-cpu.yaml --train.steps=100
    torchrun --nnodes N --nproc-per-node G -m fast_xlstm.training.train --config FILE [--key=value ...]

One optimizer step: this rank's micro-batches run forward/backward (loss summed, divided by the
global number of targets), FSDP reduce-scatters the gradients, the replicated gate gradients are
averaged, the global gradient norm is clipped, AdamW steps with the scheduled learning rate.
A non-finite loss or gradient norm stops the run before the update, after checkpointing the last
good step.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Batch
from .metrics import MetricsLogger, device_peak_flops, mfu
from .optim import build_optimizer, grad_norm_and_clip, lr_at, set_lr
from .packing import packed_loss_sum
from .parallelize import DistEnv, destroy_distributed, init_distributed, sync_replicated_grads
from .setup import copy_tokenizer, find_tokenizer, grad_accum_steps, make_loaders, make_model, model_config

logger = logging.getLogger(__name__)

EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """The loss or gradient norm of a step was NaN or inf."""


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        if env.device.type == "cpu" and cfg.parallel.cpu_threads:
            torch.set_num_threads(cfg.parallel.cpu_threads)
        self.config = model_config(cfg)
        self.loader, self.val_loader = make_loaders(cfg, env, self.config.vocab_size)
        self.grad_accum = grad_accum_steps(cfg, env.world_size)
        self.model = make_model(cfg, self.config, env)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.num_params = self.config.num_parameters()
        self.peak_flops = cfg.log.peak_flops or device_peak_flops(env.device)
        self.ckpt_root = cfg.checkpoint_dir
        self.step = 0  # completed optimizer steps
        self.metrics = MetricsLogger(cfg.run_dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
        self.tokenizer_src = find_tokenizer(cfg, self.loader)
        if env.is_main:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            copy_tokenizer(self.tokenizer_src, self.ckpt_root / "tokenizer")
        self._maybe_resume()

    # ---- checkpoints ---------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        how = self.cfg.checkpoint.resume
        if how == "none":
            return
        if how == "auto":
            found = list_checkpoints(self.ckpt_root)
            if not found:
                return
            path = found[-1][1]
        else:
            path = resolve_checkpoint(how)
        state = load_checkpoint(path, self.model, self.optimizer, self.env)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        self.metrics.log({"event": "resume", "step": self.step, "path": str(path)}, echo=False)
        if self.env.is_main:
            print(f"[fast-xlstm] resumed from {path} at step {self.step}", file=sys.stderr, flush=True)

    def save(self, data_state: dict[str, Any] | None = None) -> Path:
        train_state = {"step": self.step, "data": data_state or self.loader.state_dict()}
        meta = {"train_config": self.cfg.to_dict(), "torch": torch.__version__}
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, train_state, self.env,
                               meta=meta, keep=self.cfg.checkpoint.keep)

    # ---- one step ------------------------------------------------------------------------------
    def _global_sum(self, value: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.env.device).clone()
        if self.env.world_size > 1:
            dist.all_reduce(t)
        return t

    def _micro_loss(self, batch: Batch) -> torch.Tensor:
        dev = self.env.device
        return packed_loss_sum(self.model, batch.input_ids.to(dev), batch.doc_starts, batch.labels.to(dev))

    def train_step(self, batches: list[Batch]) -> tuple[float, float]:
        """Forward/backward over this rank's micro-batches and the optimizer update: (loss, grad norm)."""
        targets = float(self._global_sum(sum(b.num_targets for b in batches)).clamp(min=1))
        # FSDP averages gradients over ranks; x world_size makes the result sum / global targets.
        scale = self.env.world_size / targets
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for batch in batches:
            loss = self._micro_loss(batch)
            if self.cfg.debug.nan_at_step == self.step + 1:
                loss = loss * float("nan")
            (loss * scale).backward()
            total += loss.detach().double()
        loss_value = float(self._global_sum(total)) / targets
        if not torch.isfinite(torch.tensor(loss_value)):
            raise NonFiniteError(f"loss is {loss_value}")
        sync_replicated_grads(self.model, self.env)
        norm = float(grad_norm_and_clip(self.model, self.cfg.optim.grad_clip))
        if not torch.isfinite(torch.tensor(norm)):
            raise NonFiniteError(f"gradient norm is {norm} (loss {loss_value:.4f})")
        set_lr(self.optimizer, self.lr())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm

    def lr(self) -> float:
        return lr_at(self.step, self.cfg.train.steps, self.cfg.optim.lr, self.cfg.schedule)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_loader is None:
            return None
        total, targets = 0.0, 0
        for batch in self.val_loader.fixed_rows(self.cfg.train.eval_rows):
            total += float(self._micro_loss(batch))
            targets += batch.num_targets
        return float(self._global_sum(total)) / max(1.0, float(self._global_sum(targets)))

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, env = self.cfg, self.env
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        show = cfg.log.progress == "true" or (cfg.log.progress == "auto" and sys.stderr.isatty())
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=self.step, unit="step", disable=not (show and env.is_main),
                   file=sys.stderr, dynamic_ncols=True)
        write = (lambda line: bar.write(line, file=sys.stdout)) if show else None  # lines above the bar
        busy, window_steps = 0.0, 0
        while self.step < cfg.train.steps:
            data_before = self.loader.state_dict()
            batches = self.loader.next_step(self.grad_accum)
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            t0 = time.perf_counter()
            try:
                loss, norm = self.train_step(batches)
            except NonFiniteError as exc:
                return self._stop_nonfinite(str(exc), data_before, bar)
            busy += time.perf_counter() - t0  # the float() calls above synchronised the device
            window_steps += 1
            lr = self.lr()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                tps = tokens_per_step * window_steps / busy
                record = {"step": self.step, "loss": loss, "grad_norm": norm, "lr": lr, "tokens_per_s": tps,
                          "tokens_per_s_per_device": tps / env.world_size,
                          "mfu": mfu(self.num_params, tps / env.world_size, self.peak_flops),
                          "tokens": self.step * tokens_per_step}
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    record["val_loss"] = self.evaluate()
                self.metrics.log(record, write=write)
                busy, window_steps = 0.0, 0
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                self.save()
            if cfg.debug.step_delay_s:
                time.sleep(cfg.debug.step_delay_s)
        bar.close()
        self.metrics.close()
        return 0

    def _stop_nonfinite(self, what: str, data_before: dict[str, Any], bar) -> int:
        bar.close()
        self.optimizer.zero_grad(set_to_none=True)
        path = self.save(data_before)  # model and optimizer are still those of the last good step
        failed = self.step + 1
        msg = (f"non-finite value at step {failed}: {what}. Stopped before updating the weights; the last good "
               f"step {self.step} is checkpointed in {path}. Lower optim.lr, raise schedule.warmup_steps or "
               f"tighten optim.grad_clip, then resume (checkpoint.resume=auto).")
        self.metrics.log({"event": "nonfinite", "step": failed, "message": msg, "checkpoint": str(path)}, echo=False)
        self.metrics.close()
        if self.env.is_main:
            print(f"[fast-xlstm] error: {msg}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE


def run(cfg: TrainConfig) -> int:
    """Trains according to `cfg` in this process (one of torchrun's, or a world of one)."""
    env = init_distributed(cfg.parallel.device)
    try:
        return Trainer(cfg, env).fit()
    finally:
        destroy_distributed(env)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="training config YAML (see configs/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fast_xlstm.training.train", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides: --section.key=value, e.g. --optim.lr=3e-4 --train.steps=1000")
    add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = TrainConfig.load(args.config, overrides)
        return run(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"[fast-xlstm] error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
