"""The pretraining run: engine, data, steps, logs, evaluation, checkpoints, export.

Run layout: OUTPUT_DIR/config.yaml (resolved), ds_config.json, metrics.jsonl,
checkpoints/, eval.json, model/ (exported at the end)."""
from __future__ import annotations

import dataclasses
import json
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from vlp.atomic import atomic_write_text

from vlp.config import Config, ConfigError, to_dict
from vlp.train import checkpoint
from vlp.train.budget import Budget
from vlp.train.engine import build_engine, config_precision, deepspeed_config, zero_stage
from vlp.train.evaluate import evaluate, format_table
from vlp.train.launch import World, init_distributed
from vlp.dtypes import DTYPES
from vlp.train.precision import choose_precision, resolve_precision
from vlp.train.progress import Meter, RunLog
from vlp.train.rundir import prepare_run_dir
from vlp.train.text_lock import lock_text_if_captions_repeat


class StopRequest:
    """Ctrl-C / SIGTERM ask for a checkpoint and a clean exit; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def wait(self, seconds: float) -> bool:
        """Whether a stop request arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.requested

    def tolerate_worker_deaths(self) -> None:
        """Launchers SIGTERM the whole process tree, data workers first; torch's SIGCHLD
        handler would then raise inside whatever this process is doing (a checkpoint save,
        say). Drop that error: the next batch fetch raises too, and there a shutdown can be
        told apart from a crash. Call once data workers exist (torch installs its handler)."""
        handler = signal.getsignal(signal.SIGCHLD)
        if not callable(handler) or getattr(handler, "tolerant", False):
            return

        def on_child_exit(signum, frame):
            try:
                handler(signum, frame)
            except RuntimeError:
                pass

        on_child_exit.tolerant = True
        signal.signal(signal.SIGCHLD, on_child_exit)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class BatchStream:
    """Batches across epochs. Its position (epoch, batches of it consumed) goes into
    checkpoints; a resumed run replays the interrupted epoch's draws up to where it stopped."""

    def __init__(self, loader, epoch: int = 0, batch_in_epoch: int = 0):
        self.loader, self.epoch, self.batch_in_epoch = loader, epoch, batch_in_epoch
        self._batches = None

    def __next__(self) -> dict:
        while True:
            if self._batches is None:
                self.loader.set_epoch(self.epoch)
                self._batches = enumerate(self.loader)
            for index, batch in self._batches:
                if index >= self.batch_in_epoch:
                    self.batch_in_epoch = index + 1
                    return batch
            self._batches = None
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def position(self) -> tuple[int, int]:
        """(epoch, batch) to resume from; a finished epoch resumes at the next one's start."""
        if self.batch_in_epoch >= len(self.loader):
            return self.epoch + 1, 0
        return self.epoch, self.batch_in_epoch


@dataclass
class RunState:
    """What a checkpoint's trainer.json restores, besides the engine and the RNGs."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    # Wall-clock seconds of training so far (the time budget continues from here on resume).
    train_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def to_device(batch: dict[str, Any], device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to the device; float tensors (images) to the engine's compute dtype."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, dtype=dtype if value.is_floating_point() else None)
        out[key] = value
    return out


def peak_memory_mb(world: World) -> float:
    """Peak accelerator memory allocated on GPU; peak resident set of this process on CPU."""
    if world.on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    def __init__(self, cfg: Config):
        from deepspeed.accelerator import get_accelerator

        from vlp.data import build_tokenizer, expand_spec, train_loader
        from vlp.foils import training_foils
        from vlp.model import build_model

        self.cfg = cfg
        # User mistakes fail here, before any process group or model exists.
        train_urls = expand_spec(cfg.data.train, "data.train")
        if cfg.data.val:
            expand_spec(cfg.data.val, "data.val")  # not at the first eval, minutes later
        self.foils = training_foils(cfg)
        if cfg.loss.weighting == "gradnorm" and zero_stage(cfg.train) == 3:
            # ZeRO-3 partitions the shared layer's weight: no rank holds it to take ∇_W Lₖ.
            raise ConfigError("loss.weighting=gradnorm does not work with ZeRO-3 (the shared layer's "
                              "weights are partitioned); use train.zero_stage <= 2 or another weighting")
        prepare_run_dir(Path(cfg.output_dir), cfg.train.resume, cfg.train.overwrite)
        accelerator = get_accelerator()
        on_gpu = accelerator.device_name() != "cpu"
        precision = resolve_precision(cfg.train.precision, on_gpu, accelerator.is_bf16_supported())
        self.world = world = init_distributed(cfg.train.threads)
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume_from = checkpoint.find_checkpoint(cfg.train.resume, self.ckpt_dir, world) if cfg.train.resume else None
        self.tokenizer = build_tokenizer(cfg.model.text)
        lock_text_if_captions_repeat(cfg, train_urls, log=print if world.is_main else lambda text: None)
        self.loader = train_loader(cfg.data, self.tokenizer, rank=world.rank, world_size=world.world_size)
        # Same seed everywhere so every rank builds identical initial weights.
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        model.set_grad_checkpointing(cfg.model.grad_checkpointing)
        # The pairs one loss sees: a micro-batch from every rank (a resume overwrites the result).
        model.start_training(cfg.data.batch_size * world.world_size)
        if self.resume_from is not None and precision == "auto":
            # The optimizer state in the checkpoint is in the precision the run started with.
            precision = checkpoint.read_trainer_state(self.resume_from)["precision"]
        precision = choose_precision(precision, on_gpu, accelerator.is_bf16_supported(), model,
                                     cfg.data.image_size, cfg.data.max_len, cfg.data.batch_size,
                                     log=print if world.is_main else lambda text: None)
        self.ds_config = deepspeed_config(cfg.train, cfg.data.batch_size, world.world_size, precision)
        self.budget = Budget(cfg.train.max_minutes, cfg.train.steps)
        self.engine, self.group_names = build_engine(model, cfg.train, self.ds_config, self.budget)
        self.precision = config_precision(self.ds_config)
        self.dtype = DTYPES[self.precision]
        torch.manual_seed(cfg.train.seed * 1000 + world.rank)  # per-rank dropout / sampling
        self.state = RunState()
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", self.config_yaml)
            atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=1))
        self.resume()
        self.stream = BatchStream(self.loader, self.state.epoch, self.state.batch_in_epoch)
        self.log = RunLog(self.run_dir, cfg.train.steps, self.state.step, world.is_main)
        self.meter = Meter()
        self._last_means: dict[str, float] = {}
        self.last_eval: dict[str, Any] | None = None

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> None:
        path = self.resume_from
        if path is None:
            if self.cfg.train.resume and self.world.is_main:
                print(f"resume=auto: no checkpoint in {self.ckpt_dir}, starting fresh", flush=True)
            return
        self.state = RunState.from_checkpoint(checkpoint.load(self.engine, path, self.world))
        self.budget.spent = self.state.train_seconds
        if self.world.is_main:
            spent = f", {self.state.train_seconds / 60:.1f} min of training spent" if self.budget.enabled else ""
            print(f"resumed from {path} at step {self.state.step} (data epoch {self.state.epoch}, "
                  f"batch {self.state.batch_in_epoch}{spent})", flush=True)

    def save(self) -> Path:
        self.state.epoch, self.state.batch_in_epoch = self.stream.position()
        self.state.train_seconds = self.budget.elapsed
        saved = dataclasses.asdict(self.state)
        saved.update(zero_stage=self.ds_config["zero_optimization"]["stage"],
                     precision=self.precision, world_size=self.world.world_size,
                     param_group_names=self.group_names)
        path = checkpoint.save(self.engine, self.ckpt_dir, self.state.step, saved,
                               self.config_yaml, self.world, self.cfg.train.keep_checkpoints)
        self.log.print(f"checkpoint: {path}")
        return path

    # ------------------------------------------------------------------ steps

    def agree(self, stop: StopRequest) -> bool:
        """One collective per micro-batch: whether any rank was asked to stop (so all save
        the same step), and rank 0's clock for the budget (so all ranks use the same LR and
        stop at the same step)."""
        requested = stop.requested
        elapsed = self.budget.local_elapsed() if self.world.is_main else 0.0
        if self.world.world_size > 1:
            flags = torch.tensor([float(requested), elapsed], dtype=torch.float64, device=self.world.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            requested, elapsed = bool(flags[0].item()), float(flags[1].item())
        self.budget.elapsed = elapsed
        return requested

    def train_step(self, stop: StopRequest) -> bool:
        """One optimizer step (grad_accum micro-batches). False when asked to stop."""
        start = time.perf_counter()
        data_time = 0.0
        terms: dict[str, torch.Tensor] = {}
        skipped: dict[str, int] = {}
        samples = 0
        self.engine.module.set_training_progress(self.state.step, self.budget.progress(self.state.step))
        for micro in range(self.cfg.train.grad_accum):
            fetch = time.perf_counter()
            try:
                batch = next(self.stream)
                stop.tolerate_worker_deaths()
            except Exception:
                # Workers killed by a launcher's shutdown die just before this process is
                # signalled; any other data error is a real one.
                if not stop.wait(5.0):
                    raise
                batch = None
            data_time += time.perf_counter() - fetch
            if self.agree(stop):  # every micro-batch: a killed loader can fail at any
                return False
            for reason, count in batch["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
            out = self.engine(to_device(batch, self.world.device, self.dtype))
            self.engine.backward(out["loss"])
            self.engine.step()
            samples += batch["image"].shape[0]
            for name, value in out.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    value = value.detach().float().reshape(())
                    terms[name] = terms.get(name, 0.0) + value / self.cfg.train.grad_accum
        # Before clipping: shows when train.grad_clip is what limits the updates.
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            terms["grad_norm"] = torch.as_tensor(grad_norm).detach().float().reshape(())
        self.state.step += 1
        self.state.samples += samples * self.world.world_size
        step_time = time.perf_counter() - start
        self.meter.add(terms, samples * self.world.world_size, step_time, data_time, skipped)
        self.log.step(self._last_means, self.current_lr(), self.world.world_size, step_time,
                      data_time, samples * self.world.world_size, self.budget.remaining_minutes())
        return True

    def current_lr(self) -> float:
        """The highest learning rate of any param group now: the one that is training (in a
        second stage the towers' groups are at 0, before it the new layers' are)."""
        return max(self.engine.get_lr())

    def log_train(self) -> None:
        """Average the window over ranks, add up skips, write one metrics line."""
        meter = self.meter
        names = sorted(meter.terms)
        # Terms may sit on different devices: DeepSpeed's fp16 optimizer returns the grad norm
        # as a Python float, its bf16 one as a tensor on the GPU.
        values = torch.stack([torch.as_tensor(meter.terms[n], dtype=torch.float32).to(self.world.device)
                              for n in names]) / max(1, meter.steps)
        skipped: list[dict[str, int]] = [meter.skipped]
        if self.world.world_size > 1:
            dist.all_reduce(values)
            values /= self.world.world_size
            skipped = [None] * self.world.world_size
            dist.all_gather_object(skipped, meter.skipped)
        window = {}
        for part in skipped:
            for reason, count in part.items():
                window[reason] = window.get(reason, 0) + count
                self.state.skipped[reason] = self.state.skipped.get(reason, 0) + count
        means = dict(zip(names, values.tolist()))
        shown = ("loss", *self.engine.module.loss_names())
        self._last_means = {k: v for k, v in means.items() if k in shown}
        rate = meter.samples / max(meter.step_time, 1e-9)
        self.log.record(self.state.step, "train", {
            **means, "lr": self.current_lr(), "samples_per_s": rate,
            "samples_per_s_per_rank": rate / self.world.world_size,
            "data_wait": meter.data_time / max(meter.step_time, 1e-9), "epoch": self.stream.epoch,
            "train_minutes": self.budget.elapsed / 60,
            "peak_mem_mb": peak_memory_mb(self.world),
            "skipped": dict(self.state.skipped), "skipped_window": window})
        if window:
            self.log.print(f"step {self.state.step}: skipped {window} (total {self.state.skipped})")
        meter.reset()

    # ------------------------------------------------------------------ eval

    def run_eval(self, show: bool = True) -> dict[str, Any] | None:
        from vlp.data import eval_loader

        if not self.cfg.data.val:
            return None
        # Every rank reads the whole val set (see vlp.train.evaluate).
        batches = eval_loader(self.cfg.data, self.tokenizer, rank=0, world_size=1)
        started = time.perf_counter()
        results = evaluate(self.engine.module, batches, device=self.world.device, dtype=self.dtype,
                           rerank_k=self.cfg.eval.itm_rerank_k, batch_size=self.cfg.eval.batch_size,
                           rank=self.world.rank, world_size=self.world.world_size,
                           zero3=self.ds_config["zero_optimization"]["stage"] == 3, foils=self.foils,
                           caption_samples=self.cfg.eval.caption_samples,
                           caption_meteor=self.cfg.eval.caption_meteor)
        results["seconds"] = time.perf_counter() - started
        self.log.record(self.state.step, "eval", results)
        if show:
            self.log.print(f"eval at step {self.state.step} ({results['seconds']:.0f} s):\n"
                           + format_table(results))
        self.last_eval = results
        return results

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any] | None:
        cfg = self.cfg.train
        stop = StopRequest()
        saved_at = self.state.step if self.resume_from else -1
        interrupted = False
        started = time.perf_counter()
        self.budget.start()
        try:
            while self.state.step < cfg.steps and not self.budget.exhausted():
                if not self.train_step(stop):
                    interrupted = True
                    break
                step = self.state.step
                last = step == cfg.steps or self.budget.exhausted()
                if step % cfg.log_every == 0 or last:
                    self.log_train()
                if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                    self.run_eval()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save()
                    saved_at = step
            if self.budget.exhausted():
                self.log.print(f"time budget of {cfg.max_minutes:g} min reached at step {self.state.step}")
            if self.state.step != saved_at:
                self.save()
        finally:
            stop.restore()
            self.log.close()
        if interrupted:
            if self.world.is_main:
                print(f"stopped by signal at step {self.state.step}; resume with --resume", flush=True)
            return None
        results = self.run_eval(show=False)  # finish() prints the final table
        self.finish(results, time.perf_counter() - started)
        return results

    def finish(self, results: dict[str, Any] | None, seconds: float) -> None:
        from vlp.train.export import export_model_dir

        if self.world.is_main:
            final = checkpoint.list_checkpoints(self.ckpt_dir)[-1]
            export_model_dir(final, self.run_dir / "model")
            if results is not None:
                atomic_write_text(self.run_dir / "eval.json", json.dumps(
                    {"step": self.state.step, **results}, indent=1))
                print(format_table(results), flush=True)
            print(f"done: {self.state.step} steps in {seconds:.0f} s; model: {self.run_dir / 'model'}; "
                  f"skipped samples: {self.state.skipped or 'none'}", flush=True)
        dist.barrier()


def pretrain(cfg: Config) -> dict[str, Any] | None:
    """Train per `cfg`; returns the final eval results (None when stopped by a signal)."""
    if cfg.train.steps < 1:
        raise ConfigError("config key 'train.steps' must be >= 1")
    return Trainer(cfg).run()
