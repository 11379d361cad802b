"""Training: the paper's recipe as one short loop.

    resnetlab train --model resnet20 --data mnist:../shared/data/mnist --recipe cifar --iterations 300 --out runs/x

writes into OUT: metrics.jsonl (a line every log_every iterations; with --tensorboard the same numbers as scalars
under tb/), checkpoint.pt (atomically, every checkpoint_every iterations and at the end), summary.json and
model.safetensors at the end. With --init the run starts from other weights (checkpoint.load_weights), with
--freeze-backbone it trains the classifier alone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from resnetlab import distributed
from resnetlab.checkpoint import (
    CheckpointError,
    checkpoint_path,
    export_safetensors,
    load_checkpoint,
    load_weights,
    read_weights,
    restore_weights,
    save_checkpoint,
)
from resnetlab.data.augment import Normalize
from resnetlab.data.datasets import DataSplits
from resnetlab.data.spec import load_dataset
from resnetlab.evaluate import class_probabilities, top_k_error
from resnetlab.factory import create_model
from resnetlab.files import write_json_atomically
from resnetlab.models import MODELS
from resnetlab.precision import Precision, autocast, memory_format, pick_device, resolve_precision
from resnetlab.progress import Progress
from resnetlab.recipes import COMPUTE_KEYS, Recipe, TrainConfig, flag, validate
from resnetlab.runlog import (
    MetricsLog,
    NonFiniteLossError,
    StopOnSignal,
    check_finite_weights,
    ensure_writable,
    last_good_state,
)
from resnetlab.schedule import LrSchedule


@dataclass
class Run:
    """What the loop works with, built from a TrainConfig by `prepare`."""

    config: TrainConfig
    data: DataSplits
    network: torch.nn.Module  # the ResNet itself: evaluated, and its state_dict saved
    trained: torch.nn.Module  # what the training step calls: the network, or it wrapped in DistributedDataParallel
    model_kwargs: dict
    normalize: Normalize
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    device: torch.device
    precision: Precision  # config.precision as it runs on `device`
    context: distributed.Context
    start: int = 0
    elapsed: float = 0.0  # wall seconds of earlier sessions of a resumed run
    init: dict | None = None  # where the starting weights came from (--init): path, sha256, what was adapted
    metrics: MetricsLog | None = None  # rank 0 alone writes metrics


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train as `config` says; with `resume`, continue from the checkpoint in config.out. Returns the summary."""
    run = prepare(config, resume)
    out, recipe, context = Path(config.out), config.recipe, run.context
    device, layout = run.device, memory_format(config.channels_last)
    run.trained.train()
    forward = torch.compile(run.trained) if config.compile else graphed(run) if config.cuda_graphs else run.trained
    bar = Progress(recipe.iterations, config.model, start=run.start, enabled=progress and context.is_main)
    # Loss and error sums since the last log line stay on the device: the loop reads them (and waits for the device)
    # only at log points, and every batch only while a deep net warms up, whose lr depends on each batch's error.
    window, batches_in_window, shown = torch.zeros(2, dtype=torch.float64, device=device), 0, {}
    stopping = False  # a signal asked the run to stop (StopOnSignal) before its last iteration
    session_start = window_start = time.perf_counter()
    with StopOnSignal(enabled=context.world_size == 1) as stop:
        for iteration, (images, labels) in enumerate(training_batches(run), start=run.start):
            lr = run.schedule.lr(iteration)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x = run.normalize(images.to(device, non_blocking=True)).contiguous(memory_format=layout)
            loss_and_error = training_step(forward, run.optimizer, x, labels.to(device, non_blocking=True),
                                           device=device, precision=run.precision)
            window += loss_and_error
            batches_in_window += 1
            if run.schedule.warming_up:
                run.schedule.observe_batch_error(distributed.mean_over_processes(loss_and_error, context)[1].item())

            done = iteration + 1
            evaluate_now = done == recipe.iterations or (config.eval_every and done % config.eval_every == 0)
            if done % config.log_every == 0 or evaluate_now:
                means = distributed.mean_over_processes(window, context) / batches_in_window
                train_loss, train_error = means.tolist()
                if not math.isfinite(train_loss):
                    raise NonFiniteLossError(f"the training loss became {train_loss} by iteration {done} (lr {lr:g}); "
                                             f"stopped. {last_good_state(out)}")
                images_per_second = batches_in_window * recipe.batch_size / (time.perf_counter() - window_start)
                record = {"iteration": done, "lr": lr, "train_loss": train_loss, "train_error": train_error,
                          "images_per_second": images_per_second}
                if evaluate_now:  # every process's schedule sees rank 0's errors
                    record.update(distributed.on_main(context, lambda: held_out_errors(run, show=progress)))
                    run.schedule.observe_validation_error(record.get("val_error", record["train_error"]))
                if run.metrics:
                    run.metrics.write(record)
                shown = {"loss": f"{train_loss:.3f}", "err": f"{100 * train_error:.1f}%",
                         "img_s": f"{images_per_second:.0f}"}
                window.zero_()
                batches_in_window = 0
                window_start = time.perf_counter()  # evaluation time is not training throughput
            stopping = stop.signal_number is not None and done < recipe.iterations
            if (done == recipe.iterations or stopping
                    or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                check_finite_weights(run.network, done, out)
                save_state(run, done, run.elapsed + time.perf_counter() - session_start)
            bar.update(done, **shown)
            if stopping:
                break
    bar.close()
    if run.metrics:
        run.metrics.close()
    if stopping:
        raise stop.stopped(done, recipe.iterations, out, "resnetlab train --resume")
    summary = distributed.on_main(context, lambda: finish(run, run.elapsed + time.perf_counter() - session_start,
                                                          show=progress))
    forward = run = None  # DistributedDataParallel holds the process group: teardown frees both (see there)
    distributed.teardown(context)
    return summary


def prepare(config: TrainConfig, resume: bool) -> Run:
    validate(config)  # a TrainConfig built by hand gets the checks resolve_config makes
    out = Path(config.out)
    state = load_checkpoint(out) if resume else None
    init = read_weights(config.init) if config.init and not resume else None  # a resumed run's are in its checkpoint
    ensure_writable(out)
    device = pick_device(config.device)
    context = distributed.setup(device)
    device = distributed.local_device(device, context)
    precision = resolve_precision(config.precision, device, training=True)
    data = load_dataset(config.data, val_size=config.val_size, seed=config.seed, download=config.download,
                        resolution=config.recipe.resolution)
    torch.manual_seed(config.seed)
    model_kwargs = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    if config.shortcut is not None:
        model_kwargs["shortcut"] = config.shortcut
    if init is not None:  # another project's network may need options of its own (Weights.model_kwargs)
        model_kwargs = init.model_kwargs(model_kwargs)
    if state is not None:  # a resumed run is rebuilt as it was built, --init's options included
        model_kwargs = state["model_kwargs"]
    network = create_model(config.model, **model_kwargs)
    origin = None  # where the weights came from: --init's file, or what the resumed checkpoint recorded
    if init is not None:
        origin = {**init.provenance(), "adapted": load_weights(network, init, config.model)}
    if state is not None:
        restore_weights(network, state, checkpoint_path(out), model_name=config.model)
        origin = state.get("init")
    if config.freeze_backbone:
        network.freeze_backbone()
    network = network.to(device, memory_format=memory_format(config.channels_last))
    network.activation_checkpointing = config.activation_checkpointing
    trained = distributed.wrap(network, context, device, config.sync_bn)
    recipe = config.recipe
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=recipe.lr,
                                momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    depth = MODELS[config.model].depth
    schedule = LrSchedule(recipe, warm_up=bool(recipe.warmup_min_depth) and depth >= recipe.warmup_min_depth)
    run = Run(config, data, network, trained, model_kwargs, fit_normalize(data, recipe), optimizer, schedule,
              device, precision, context, init=origin)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
        run.start, run.elapsed = state["iteration"], state["elapsed_seconds"]
    if context.is_main:
        run.metrics = MetricsLog(out, run.start, tensorboard=config.tensorboard)
    return run


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                  device: torch.device, precision: Precision) -> torch.Tensor:
    """One SGD step on a normalized batch; returns [loss, error] of the batch as a tensor, without waiting for it."""
    with autocast(device, precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    error = (logits.argmax(1) != y).float().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss.detach(), error]).double()


def graphed(run: Run) -> torch.nn.Module:
    """The model with its training-mode forward and backward captured as CUDA graphs and replayed each step.

    A small net such as ResNet-20 runs hundreds of tiny kernels a step; launched one by one from Python the GPU
    mostly waits. Capturing runs a few warm-up steps, which move the BN running statistics: they are put back, so
    the run is the same run as without graphs. Evaluation (eval mode) takes the ordinary forward."""
    if run.device.type != "cuda" or run.context.world_size > 1:
        raise ValueError(f"--cuda-graphs needs one CUDA device; this run is on {run.device} with "
                         f"{run.context.world_size} process(es)")
    data, batch = run.data, run.config.recipe.batch_size
    sample = torch.zeros(batch, data.in_channels, data.image_size, data.image_size, device=run.device)
    sample = sample.contiguous(memory_format=memory_format(run.config.channels_last))
    saved = {name: value.clone() for name, value in run.network.state_dict().items()}
    model = torch.cuda.make_graphed_callables(run.trained, (sample,))
    run.network.load_state_dict(saved)  # copies in place: the graphs keep reading the same tensors
    return model


def training_batches(run: Run):
    config, recipe, context = run.config, run.config.recipe, run.context
    if recipe.batch_size % context.world_size:
        raise ValueError(f"--batch-size {recipe.batch_size} must be divisible by the {context.world_size} processes")
    return run.data.train.training_batches(batch_size=recipe.batch_size, seed=config.seed, start=run.start,
                                           stop=recipe.iterations, flip=run.data.flip, padding=recipe.padding,
                                           workers=config.workers, rank=context.rank, world_size=context.world_size)


def fit_normalize(data: DataSplits, recipe: Recipe) -> Normalize:
    """The paper's per-pixel mean of the training set (of up to 2,000 center crops for an image folder)."""
    return Normalize.fit(data.train.normalization_images(), per_channel_std=recipe.per_channel_std)


def held_out_errors(run: Run, show: bool = False) -> dict:
    errors = {}
    for split in ("val", "test"):
        dataset = getattr(run.data, split)
        if dataset is not None:
            scores, labels = class_probabilities(
                run.network, dataset, run.normalize, device=run.device, batch_size=run.config.eval_batch_size,
                precision=run.precision, memory_format=memory_format(run.config.channels_last),
                workers=run.config.workers, limit=run.config.test_eval_size,
                progress=f"{split} error" if show else None)
            errors[f"{split}_error"] = top_k_error(scores, labels, 1)
            errors[f"{split}_top5_error"] = top_k_error(scores, labels, 5)
    return errors


def save_state(run: Run, iteration: int, elapsed: float) -> None:
    if run.context.is_main:
        save_checkpoint({
            "model_name": run.config.model, "model_kwargs": run.model_kwargs, "classes": run.data.classes,
            "class_names": run.data.class_names,
            "normalize": run.normalize.state_dict(), "model": run.network.state_dict(),
            "optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
            "iteration": iteration, "elapsed_seconds": elapsed, "rng": {"torch": torch.get_rng_state()},
            "config": run.config.to_dict(), "data_note": run.data.note, "init": run.init,
        }, checkpoint_path(run.config.out))
    distributed.barrier(run.context)


def finish(run: Run, wall_seconds: float, show: bool = False) -> dict:
    """Final errors, summary.json and the plain weights (in rank 0 alone in a distributed run)."""
    config = run.config
    layout = memory_format(config.channels_last)
    scores, labels = class_probabilities(run.network, run.data.train, run.normalize, device=run.device,
                                         batch_size=config.eval_batch_size, precision=run.precision,
                                         memory_format=layout, workers=config.workers, limit=config.train_eval_size,
                                         progress="final training error" if show else None)
    held_out = held_out_errors(run, show)
    summary = {
        "model": config.model, "dataset": config.data, "data_note": run.data.note,
        "iterations": config.recipe.iterations, "train_top1_error": top_k_error(scores, labels, 1),
        "test_top1_error": held_out["test_error"], "test_top5_error": held_out["test_top5_error"],
        **({"val_top1_error": held_out["val_error"]} if "val_error" in held_out else {}),
        "wall_seconds": wall_seconds,
        "images_per_second": config.recipe.iterations * config.recipe.batch_size / max(wall_seconds, 1e-9),
        "device": str(run.device), "processes": run.context.world_size, "torch": torch.__version__,
        "init": run.init, "config": config.to_dict(),
    }
    out = Path(config.out)
    write_json_atomically(out / "summary.json", summary)
    export_safetensors(run.network, out / "model.safetensors",
                       metadata={"model": config.model, "model_kwargs": json.dumps(run.model_kwargs)})
    return summary


def resume_config(out: str | Path, changes: dict | None = None) -> TrainConfig:
    """The configuration a run directory was started with, read from its checkpoint.

    `changes` (flags given with --resume) may move the run to other hardware (COMPUTE_KEYS: a run started on a GPU
    with --cuda-graphs continues on the CPU with --device cpu --no-cuda-graphs); any other setting that differs
    from the run's own is refused, since a run resumed with another recipe would be neither run."""
    state = load_checkpoint(out)
    if "config" not in state:
        raise CheckpointError(f"{checkpoint_path(out)} has no run configuration to resume from")
    config = TrainConfig.from_dict({**state["config"], "out": str(out)})
    stored = {**asdict(config.recipe), **config.to_dict(), "recipe": config.recipe.name}
    changes = {key: value for key, value in (changes or {}).items() if value is not None}
    conflicts = sorted(key for key, value in changes.items()
                       if key not in COMPUTE_KEYS and value != stored.get(key) and key != "out")
    if "out" in changes and Path(changes["out"]).resolve() != Path(out).resolve():
        conflicts.append("out")
    if conflicts:
        details = ", ".join(f"--{flag(key)} {changes[key]!r} (the run has {stored.get(key)!r})"
                            for key in conflicts)
        raise ValueError(f"{out} resumes as it was started; these flags differ from it: {details}. Only "
                         f"{', '.join('--' + flag(key) for key in COMPUTE_KEYS)} may change on resume")
    config = replace(config, **{key: value for key, value in changes.items() if key in COMPUTE_KEYS})
    validate(config)
    return config
