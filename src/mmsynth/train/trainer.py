"""The one training loop. Every method (CLIP, VAE, text-to-image, later ControlNet, adapters, ...)
trains through `train()`; what differs lives in its recipe (recipe.py), never here.

Read top to bottom: set-up (accelerate, models, optimiser, EMA), resume, the loop (micro-batches
with gradient accumulation, optimiser step, EMA, log row, sample grid, checkpoint), export.
Exact resume rests on two choices: the data each step reads is a function of the step (data.py),
and the random numbers of each micro-step come from a generator seeded by (seed, step, micro, rank).
So a run stopped after a checkpoint and resumed equals an uninterrupted one.

Multi-GPU / multi-node: `accelerate launch -m mmsynth.cli.main train ...` runs this same code.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.optimization import get_wsd_schedule

from mmsynth.errors import InputError
from mmsynth.io import check_writable, save_image, user_permissions, write_json, write_text
from mmsynth.train.config import TrainConfig, to_dict
from mmsynth.train.data import StepBatches
from mmsynth.train.recipes import get_recipe

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete
# what a run writes into its folder: `overwrite` replaces these and never touches anything else
RUN_ENTRIES = ("config.yaml", "log.csv", "samples", "checkpoints", "exports", "final", "summary.json")


@dataclass
class TrainResult:
    out: Path  # run folder
    export: Path  # the trained artefact (OUT/final)
    step: int
    last_loss: float
    seconds_per_step: float


def train(
    config: TrainConfig,
    options: Any,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    export_only: bool = False,
    time_limit_s: float | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train `config.recipe` to `config.max_steps` and export the result to OUT/final.

    `stop_after` ends the run early at that step without exporting, as if it were killed there
    (the LR schedule still spans `max_steps`): tests and time-sliced runs use it.
    `export_only` exports the newest checkpoint's (EMA) weights to OUT/final and trains nothing, so a
    long run can be used, or stopped, at any checkpoint; it leaves the run folder's log and config alone,
    so it is safe beside a run that is still training.
    `time_limit_s` stops at the first step boundary after that much wall time (set-up included), with a checkpoint
    there and no export, so a call with a fixed length (a lent GPU, a batch-job slot, a working session) ends with
    every step it made kept and `resume` takes it on. All processes stop at the same step.
    The run folder must be new or empty unless `resume` (continue it), `export_only`, or `overwrite` (start over,
    replacing only the entries a run writes, RUN_ENTRIES) says otherwise; nothing is written before the recipe,
    its data and the folder have been checked.
    """
    started = time.perf_counter()
    if time_limit_s is not None and not time_limit_s > 0:
        raise InputError(f"the time limit must be a positive number of seconds, got {time_limit_s}")
    # ---------------------------------------------------------------- set-up
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(config.mixed_precision), gradient_accumulation_steps=config.grad_accum
    )
    # Frozen modules are stored in the half type on a GPU (memory, as diffusers' scripts do); on a CPU autocast
    # alone gives the speed, and float32 storage keeps them exact for the export.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if accelerator.device.type == "cpu":
        weight_dtype = torch.float32
    out = Path(config.out)
    ckpt_root = out / "checkpoints"
    _check_run_folder(out, resume=resume, export_only=export_only, overwrite=overwrite)
    recipe = get_recipe(config.recipe)(config, options)
    torch.manual_seed(config.seed)  # model initialisation
    recipe.build()
    recipe.place(accelerator.device, weight_dtype)

    optimizer = torch.optim.AdamW(
        recipe.parameters(),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    lr_scheduler = _lr_scheduler(config, optimizer, accelerator.num_processes)
    names = list(recipe.trainable)
    prepared = accelerator.prepare(*[recipe.models[n] for n in names], optimizer, lr_scheduler)
    *modules, optimizer, lr_scheduler = prepared
    for name, module in zip(names, modules):
        recipe.models[name] = module  # the recipe's forward passes now go through DDP/autocast wrappers
    emas: dict[str, EMAModel] = {}
    if config.ema:
        for name in names:
            emas[name] = EMAModel(
                accelerator.unwrap_model(recipe.models[name]).parameters(),
                decay=config.ema_decay,
                use_ema_warmup=True,  # decay ramps up from 0: early EMA follows the fast-changing weights
            )
            emas[name].to(accelerator.device)
            accelerator.register_for_checkpointing(emas[name])

    # ---------------------------------------------------------------- resume
    step = 0
    if export_only:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            raise InputError(f"'{ckpt_root}' has no complete checkpoint to export")
        step = _load_checkpoint(accelerator, latest, config)
        return _export(accelerator, recipe, names, emas, out, config, step, math.nan, math.nan, str(latest))
    if resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            logger.warning("mmsynth train: --resume given but no checkpoint in %s; starting from step 0", ckpt_root)
        else:
            step = _load_checkpoint(accelerator, latest, config)
    dataset = recipe.dataset()  # a bad data path fails here, before the run folder is written
    if accelerator.is_main_process:
        if overwrite and not resume:
            for name in RUN_ENTRIES:
                entry = out / name
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_text(yaml.safe_dump(to_dict(config, options), sort_keys=False), out / "config.yaml")
        _truncate_log(out / "log.csv", step)
        recipe.started(step)

    loader = DataLoader(
        dataset,
        batch_sampler=StepBatches(
            step, config.max_steps, config.batch_size, config.grad_accum, accelerator.num_processes,
            accelerator.process_index,
        ),
        collate_fn=recipe.collate,
        num_workers=config.num_workers,
        persistent_workers=False,
    )  # fmt: skip

    # ---------------------------------------------------------------- loop
    bar = tqdm(
        total=config.max_steps,
        initial=step,
        desc=f"train {config.recipe}",
        disable=not (progress and accelerator.is_local_main_process),
    )
    batches = iter(loader)
    window: dict[str, list[float]] = {}
    window_start, train_time, last_loss, seconds_per_step = time.perf_counter(), 0.0, math.nan, math.nan
    while step < config.max_steps:
        for micro in range(config.grad_accum):
            batch = _to_device(next(batches), accelerator.device)
            with _seeded(config.seed, step, micro, accelerator.process_index), accelerator.accumulate(*modules):
                with accelerator.autocast():
                    loss, logs = recipe.loss(batch, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm
                    )
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.detach().item(), **logs}.items():
                window.setdefault(key, []).append(float(value))
        step += 1
        for name, ema in emas.items():
            ema.step(accelerator.unwrap_model(recipe.models[name]).parameters())
        bar.update(1)

        if step % config.log_every == 0 or step == config.max_steps:
            elapsed = time.perf_counter() - window_start
            train_time += elapsed
            n_steps = len(window["loss"]) // config.grad_accum
            seconds_per_step = elapsed / max(1, n_steps)
            row = {key: _mean_over_processes(accelerator, values) for key, values in window.items()}
            last_loss = row["loss"]
            row = {
                "step": step,
                **row,
                "lr": lr_scheduler.get_last_lr()[0],
                "sec_per_step": seconds_per_step,
                "examples_per_sec": config.batch_size
                * config.grad_accum
                * accelerator.num_processes
                / max(seconds_per_step, 1e-9),
            }
            if accelerator.is_main_process:
                _append_log(out / "log.csv", row)
            bar.set_postfix(loss=f"{last_loss:.4f}", s_per_step=f"{seconds_per_step:.2f}")
            window = {}
        pause = time.perf_counter()
        if config.sample_every and (step % config.sample_every == 0 or step == config.max_steps):
            if accelerator.is_main_process:
                with _ema_weights(emas, recipe, accelerator):
                    grid = recipe.sample_grid(step)
                if grid is not None:
                    save_image(grid, out / "samples" / f"step_{step:07d}.png")
            accelerator.wait_for_everyone()
        if config.export_every and step % config.export_every == 0:
            if accelerator.is_main_process:
                with _ema_weights(emas, recipe, accelerator):
                    recipe.export(out / "exports" / checkpoint_name(step))
            accelerator.wait_for_everyone()
        checkpointed = step % config.checkpoint_every == 0 or step == config.max_steps
        if checkpointed:
            _save_checkpoint(accelerator, ckpt_root, step, config)
        if stop_after is not None and step >= stop_after:
            break
        if time_limit_s is not None and step < config.max_steps:
            if time.perf_counter() - started >= time_limit_s:
                accelerator.set_trigger()
            if accelerator.check_trigger():  # any process out of time: all stop at this step
                if not checkpointed:
                    _save_checkpoint(accelerator, ckpt_root, step, config)
                logger.info("mmsynth train: time limit reached at step %d of %d", step, config.max_steps)
                break
        if step % config.log_every == 0 or step == config.max_steps:
            window_start = time.perf_counter()
        else:
            window_start += time.perf_counter() - pause  # keep sampling/checkpoint time out of s/step
    bar.close()
    if step < config.max_steps:
        accelerator.end_training()
        return TrainResult(out, out / "final", step, last_loss, seconds_per_step)

    # ---------------------------------------------------------------- export
    return _export(accelerator, recipe, names, emas, out, config, step, last_loss, seconds_per_step, None)


def _export(
    accelerator: Accelerator,
    recipe: Any,
    names: list[str],
    emas: dict[str, EMAModel],
    out: Path,
    config: TrainConfig,
    step: int,
    last_loss: float,
    seconds_per_step: float,
    checkpoint: str | None,
) -> TrainResult:
    """Write the (EMA) weights to OUT/final in the owning libraries' formats, and OUT/summary.json."""
    final = out / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name in names:
            recipe.models[name] = accelerator.unwrap_model(recipe.models[name])
        with _ema_weights(emas, recipe, accelerator):
            recipe.export(final)
        summary: dict[str, Any] = {"recipe": config.recipe, "step": step}
        if checkpoint is None:
            summary.update(last_loss=last_loss, seconds_per_step=seconds_per_step)
        else:
            summary["exported_from"] = checkpoint
        write_json(summary, out / "summary.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, final, step, last_loss, seconds_per_step)


# -------------------------------------------------------------------- helpers


def _mixed_precision(choice: str) -> str:
    """'auto': bf16 where the GPU supports it, else fp16 on a GPU, full precision on a CPU. bf16 on a CPU
    without bf16 units is kept (a config says what it wants) with a warning: there it is emulated and slower."""
    if choice == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        logger.warning("mmsynth train: mixed_precision bf16 on a CPU without bf16 units (%s) is emulated and "
                       "slower than fp32 (a zoo CLIP step of 128 on a 2-core AVX2 CPU: 94 s in bf16, 10.6 s in fp32): "
                       "--set mixed_precision=no", torch.backends.cpu.get_cpu_capability())  # fmt: skip
    if choice == "fp16" and not torch.cuda.is_available():
        logger.warning("mmsynth train: mixed_precision fp16 needs a GPU; on this CPU the run is full precision "
                       "(bf16 is the CPU's half type)")
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where CPU autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def _seeded(seed: int, step: int, micro: int, rank: int):
    """Seed torch's RNG from (seed, step, micro, rank): each micro-step's noise is reproducible on resume."""
    entropy = np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0]
    torch.manual_seed(int(entropy) & ((1 << 63) - 1))
    yield


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _mean_over_processes(accelerator: Accelerator, values: list[float]) -> float:
    local = torch.tensor(sum(values) / max(1, len(values)), device=accelerator.device)
    return float(accelerator.reduce(local, reduction="mean")) if accelerator.num_processes > 1 else float(local)


@contextlib.contextmanager
def _ema_weights(emas: dict[str, EMAModel], recipe: Any, accelerator: Accelerator):
    """Swap the EMA weights into the trainable modules for sampling/export, then swap back."""
    params = {n: list(accelerator.unwrap_model(recipe.models[n]).parameters()) for n in emas}
    for name, ema in emas.items():
        ema.store(params[name])
        ema.copy_to(params[name])
    try:
        yield
    finally:
        for name, ema in emas.items():
            ema.restore(params[name])


def _check_run_folder(out: Path, resume: bool, export_only: bool, overwrite: bool) -> None:
    """Refuse, before any work, a run folder that cannot be written or holds something this run would replace."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; expected a run folder")
    check_writable(out, "--out", out)
    if resume or export_only or overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    if latest_checkpoint(out / "checkpoints") is not None:
        raise InputError(f"'{out}' already has checkpoints: pass --resume to continue, --overwrite to start over, or "
                         "choose another --out")
    raise InputError(f"--out '{out}' already exists and is not empty: pass --overwrite to start a run there (replacing "
                     f"only {', '.join(RUN_ENTRIES)}), or choose another --out")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (one with its state file; temp folders are ignored)."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def _save_checkpoint(accelerator: Accelerator, root: Path, step: int, config: TrainConfig) -> None:
    """Models, optimiser, LR schedule, EMA and RNG states via accelerate, into a temp dir renamed when done."""
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "examples_seen": step * config.batch_size * config.grad_accum * accelerator.num_processes,
            "batch_size": config.batch_size,
            "grad_accum": config.grad_accum,
            "num_processes": accelerator.num_processes,
            "recipe": config.recipe,
            "seed": config.seed,
        }
        write_json(state, tmp / STATE_FILE)
        user_permissions(tmp)  # accelerate's safetensors files are written 0600
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(
            (p for p in root.iterdir() if p.name.startswith("step_")), key=lambda p: int(p.name.split("_")[1])
        )
        for old in done[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, path: Path, config: TrainConfig) -> int:
    """Restore a checkpoint; refuse one whose data layout (batch, accumulation, processes, recipe) differs."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            f"checkpoint '{path}' is unreadable ({exc.__class__.__name__}); delete it to resume earlier"
        ) from None
    expect = {
        "recipe": config.recipe,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "num_processes": accelerator.num_processes,
    }
    for key, value in expect.items():
        if state.get(key) != value:
            raise InputError(
                f"checkpoint '{path}' was written with {key}={state.get(key)}, this run has {key}={value}; "
                "exact resume needs the same value"
            )
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # corrupt files: one clear line
        raise InputError(
            f"checkpoint '{path}' is corrupt or incomplete ({exc.__class__.__name__}); delete it to resume earlier"
        ) from None
    return step


def _lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, processes: int) -> LRScheduler:
    """diffusers' schedules, and transformers' warmup-stable-decay (steps scale with processes: accelerate
    steps a prepared scheduler once per process)."""
    if config.lr_schedule == "warmup_stable_decay":
        return get_wsd_schedule(
            optimizer, num_warmup_steps=config.warmup_steps * processes, num_decay_steps=config.decay_steps * processes,
            num_training_steps=config.max_steps * processes, decay_type="cosine",
        )  # fmt: skip
    return get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps * processes,
        num_training_steps=config.max_steps * processes,
    )


def _truncate_log(path: Path, step: int) -> None:
    """On (re)start, drop log rows beyond the resumed step so the CSV has each step once."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        fieldnames = list(rows[0].keys()) if rows else []
    keep = [r for r in rows if int(r["step"]) <= step]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            fieldnames = next(csv.reader(f), list(row))
    else:
        fieldnames = list(row)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
