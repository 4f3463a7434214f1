"""The pretraining run: engine, data, steps, logs, evaluation, checkpoints, export.

Run layout: OUTPUT_DIR/config.yaml (resolved), ds_config.json, metrics.jsonl,
checkpoints/, eval.json, model/ (exported at the end)."""
from __future__ import annotations

import json
import resource
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import yaml

from vlp.atomic import atomic_write_text

from vlp.config import Config, ConfigError, to_dict
from vlp.train import checkpoint
from vlp.train.engine import build_engine, config_precision, deepspeed_config, resolve_precision
from vlp.train.evaluate import evaluate, format_table
from vlp.train.launch import World, init_distributed
from vlp.train.progress import Meter, RunLog

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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

    def agreed(self, world: World) -> bool:
        """True on every rank once any rank was asked to stop (so all save the same step)."""
        if world.world_size == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def batch_stream(loader, state: dict[str, Any]) -> Iterator[dict]:
    """Batches across epochs, keeping state["epoch"] / state["batch_in_epoch"] current.
    A resumed run replays the interrupted epoch's draws up to where it stopped."""
    while True:
        loader.set_epoch(state["epoch"])
        for index, batch in enumerate(loader):
            if index < state["batch_in_epoch"]:
                continue
            state["batch_in_epoch"] = index + 1
            yield batch
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


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
        from vlp.model import build_model

        self.cfg = cfg
        # User mistakes fail here, before any process group or model exists.
        expand_spec(cfg.data.train, "data.train")
        if cfg.data.val:
            expand_spec(cfg.data.val, "data.val")  # not at the first eval, minutes later
        accelerator = get_accelerator()
        precision = resolve_precision(cfg.train.precision, accelerator.device_name() != "cpu",
                                      accelerator.is_bf16_supported())
        self.world = world = init_distributed(cfg.train.threads)
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tokenizer = build_tokenizer(cfg.model.text)
        self.loader = train_loader(cfg.data, self.tokenizer, rank=world.rank, world_size=world.world_size)
        # Same seed everywhere so every rank builds identical initial weights.
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.ds_config = deepspeed_config(cfg.train, cfg.data.batch_size, world.world_size, precision)
        self.engine, self.group_names = build_engine(model, cfg.train, self.ds_config)
        self.precision = config_precision(self.ds_config)
        self.dtype = DTYPES[self.precision]
        torch.manual_seed(cfg.train.seed * 1000 + world.rank)  # per-rank dropout / sampling
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0,
                                      "skipped": {}}
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", self.config_yaml)
            atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=1))
        self.resume()
        self.log = RunLog(self.run_dir, cfg.train.steps, self.state["step"], world.is_main)
        self.meter = Meter()
        self._last_means: dict[str, float] = {}
        self.last_eval: dict[str, Any] | None = None

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> None:
        spec = self.cfg.train.resume
        if not spec:
            return
        path = checkpoint.find_checkpoint(spec, self.ckpt_dir)
        if path is None:
            if self.world.is_main:
                print(f"resume=auto: no checkpoint in {self.ckpt_dir}, starting fresh", flush=True)
            return
        self.state.update(checkpoint.load(self.engine, path, self.world))
        if self.world.is_main:
            print(f"resumed from {path} at step {self.state['step']} (data epoch "
                  f"{self.state['epoch']}, batch {self.state['batch_in_epoch']})", flush=True)

    def save(self) -> Path:
        state = dict(self.state)
        if state["batch_in_epoch"] >= len(self.loader):
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
        state.update(zero_stage=self.ds_config["zero_optimization"]["stage"],
                     precision=self.precision, world_size=self.world.world_size,
                     param_group_names=self.group_names)
        path = checkpoint.save(self.engine, self.ckpt_dir, self.state["step"], state,
                               self.config_yaml, self.world, self.cfg.train.keep_checkpoints)
        self.log.print(f"checkpoint: {path}")
        return path

    # ------------------------------------------------------------------ steps

    def train_step(self, stream: Iterator[dict], stop: StopRequest) -> bool:
        """One optimizer step (grad_accum micro-batches). False when asked to stop."""
        start = time.perf_counter()
        data_time = 0.0
        terms: dict[str, torch.Tensor] = {}
        skipped: dict[str, int] = {}
        samples = 0
        self.engine.module.set_training_step(self.state["step"])
        for micro in range(self.cfg.train.grad_accum):
            fetch = time.perf_counter()
            try:
                batch = next(stream)
                stop.tolerate_worker_deaths()
            except Exception:
                # Workers killed by a launcher's shutdown die just before this process is
                # signalled; any other data error is a real one.
                if not stop.wait(5.0):
                    raise
                batch = None
            data_time += time.perf_counter() - fetch
            if stop.agreed(self.world):  # every micro-batch: a killed loader can fail at any
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
        self.state["step"] += 1
        self.state["samples"] += samples * self.world.world_size
        step_time = time.perf_counter() - start
        self.meter.add(terms, samples * self.world.world_size, step_time, data_time, skipped)
        self.log.step(self._last_means, self.engine.get_lr()[0], self.world.world_size, step_time,
                      data_time, samples * self.world.world_size)
        return True

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
                self.state["skipped"][reason] = self.state["skipped"].get(reason, 0) + count
        means = dict(zip(names, values.tolist()))
        self._last_means = {k: v for k, v in means.items() if k in ("loss", "itc", "filip", "itm", "lm")}
        rate = meter.samples / max(meter.step_time, 1e-9)
        self.log.record(self.state["step"], "train", {
            **means, "lr": self.engine.get_lr()[0], "samples_per_s": rate,
            "samples_per_s_per_rank": rate / self.world.world_size,
            "data_wait": meter.data_time / max(meter.step_time, 1e-9), "epoch": self.state["epoch"],
            "peak_mem_mb": peak_memory_mb(self.world),
            "skipped": dict(self.state["skipped"]), "skipped_window": window})
        if window:
            self.log.print(f"step {self.state['step']}: skipped {window} (total {self.state['skipped']})")
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
                           zero3=self.ds_config["zero_optimization"]["stage"] == 3,
                           caption_samples=self.cfg.eval.caption_samples,
                           caption_meteor=self.cfg.eval.caption_meteor)
        results["seconds"] = time.perf_counter() - started
        self.log.record(self.state["step"], "eval", results)
        if show:
            self.log.print(f"eval at step {self.state['step']} ({results['seconds']:.0f} s):\n"
                           + format_table(results))
        self.last_eval = results
        return results

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any] | None:
        cfg = self.cfg.train
        stop = StopRequest()
        stream = batch_stream(self.loader, self.state)
        saved_at = self.state["step"] if cfg.resume else -1
        interrupted = False
        started = time.perf_counter()
        try:
            while self.state["step"] < cfg.steps:
                if not self.train_step(stream, stop):
                    interrupted = True
                    break
                step = self.state["step"]
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self.log_train()
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    self.run_eval()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save()
                    saved_at = step
            if self.state["step"] != saved_at:
                self.save()
        finally:
            stop.restore()
            self.log.close()
        if interrupted:
            if self.world.is_main:
                print(f"stopped by signal at step {self.state['step']}; resume with --resume", flush=True)
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
                    {"step": self.state["step"], **results}, indent=1))
                print(format_table(results), flush=True)
            print(f"done: {self.state['step']} steps in {seconds:.0f} s; model: {self.run_dir / 'model'}; "
                  f"skipped samples: {self.state['skipped'] or 'none'}", flush=True)
        dist.barrier()


def pretrain(cfg: Config) -> dict[str, Any] | None:
    """Train per `cfg`; returns the final eval results (None when stopped by a signal)."""
    if cfg.train.steps < 1:
        raise ConfigError("config key 'train.steps' must be >= 1")
    return Trainer(cfg).run()
