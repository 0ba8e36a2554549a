"""One training loop for every recipe, on one device or under torchrun (DistributedDataParallel)."""
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from .contract import IMAGE_SHAPE
from .data import (EpochSampler, ImageDataset, TrainingImages, batch_mixer, epoch_seed, load_cifar100,
                   split_train_val)
from .files import save_figure, write_json
from .models import build_classifier, head
from .recipes import EMA_WARMUP, RECIPES, recipe_from_dict

log = logging.getLogger(__name__)


def build_optimizer(recipe, model):
    """The optimiser over the trainable parameters; the head's learning rate is lr × head_lr_mult."""
    head_params = {id(p) for p in head(model.net).parameters()} if hasattr(model, "net") else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in head_params], "lr": recipe.lr},
              {"params": [p for p in trainable if id(p) in head_params], "lr": recipe.lr * recipe.head_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def steps_per_batch(recipe):
    """Whether the schedule steps after every batch (else after every epoch)."""
    return recipe.schedule == "warmup_cosine"


def build_scheduler(recipe, optimizer, steps_per_epoch=1):
    """The learning-rate schedule, stepped once per epoch, or once per batch when steps_per_batch(recipe)."""
    S = torch.optim.lr_scheduler
    if recipe.schedule == "step":
        return S.StepLR(optimizer, step_size=1, gamma=recipe.step_gamma)
    if recipe.schedule == "cosine":
        return S.CosineAnnealingLR(optimizer, T_max=recipe.epochs, eta_min=recipe.min_lr)
    if recipe.schedule == "warmup_restarts":
        warmup_epochs = round(recipe.warmup_epochs)
        warmup = S.LinearLR(optimizer, start_factor=1.0 / (warmup_epochs + 1), total_iters=warmup_epochs)
        restarts = S.CosineAnnealingWarmRestarts(optimizer, T_0=recipe.restart_period, T_mult=recipe.restart_mult,
                                                 eta_min=recipe.min_lr)
        return S.SequentialLR(optimizer, [warmup, restarts], milestones=[warmup_epochs])
    if recipe.schedule == "warmup_cosine":   # linear from ~0 to lr, then one cosine down to min_lr, per batch
        warmup = max(1, round(recipe.warmup_epochs * steps_per_epoch))
        total, floor = max(warmup + 1, recipe.epochs * steps_per_epoch), recipe.min_lr / recipe.lr

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            return floor + (1 - floor) * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))) / 2
        return S.LambdaLR(optimizer, factor)
    raise ValueError(f"unknown schedule {recipe.schedule!r}")


def find_batch_size(model, device, cap):
    """Largest power of two <= cap whose forward + backward fits the GPU's memory (on CPU: no probe)."""
    size = 1 << (max(cap, 1).bit_length() - 1)
    if device.type != "cuda":
        return size
    model.eval()  # probe memory without touching BatchNorm statistics
    while size > 1:
        try:
            images = torch.randint(0, 256, (size, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(images).float().sum().backward()
            break
        except torch.cuda.OutOfMemoryError:
            size //= 2
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    model.train()
    log.info("batch-size finder: %d (cap %d)", size, cap)
    return size


def ema_multi_avg_fn(decay):
    """torch's EMA update with the warmed-up decay (EMA_WARMUP); t is the AveragedModel's own count, so a resumed
    run carries on exactly."""
    def update(averages, params, num_averaged):
        t = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + t) / (EMA_WARMUP + t)))(averages, params, num_averaged)
    return update


def build_ema(recipe, model):
    """The moving average of the weights and BatchNorm statistics, when the recipe keeps one (else None)."""
    if not recipe.ema_decay:
        return None
    return AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)


def default_workers():
    """Data-loader workers per training process: the cores this process may use, shared with the other processes
    torchrun started on this machine, less one for the training step itself; at least 1, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, per_process - 1))


class EarlyStopping:
    """Stop after `patience` epochs without a lower validation loss (None: never)."""

    def __init__(self, patience, best=math.inf, stale=0):
        self.patience, self.best, self.stale = patience, best, stale

    def step(self, val_loss):
        if val_loss < self.best:
            self.best, self.stale = val_loss, 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience


@torch.no_grad()
def evaluate(model, loader, device, distributed=False):
    """(mean cross-entropy, accuracy) over a loader; DISTRIBUTED: over every rank's loader together (the same
    figures on every rank)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    if distributed:
        totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def same_on_every_rank(module):
    """Rank 0's weights and buffers on every rank. DDP syncs BatchNorm statistics only at the start of a forward,
    so after an epoch each rank holds (and the EMA averages) its own: without this the ranks would validate, and
    decide to stop, on different models."""
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, 0)


def train_one_epoch(model, loader, optimizer, recipe, device, progress, mixer=None, after_step=lambda: None):
    """One pass over LOADER; after_step runs after every optimiser step (a per-batch schedule, the EMA)."""
    model.train()
    loss_sum, correct, count, start = 0.0, 0, 0, time.perf_counter()
    for images, labels in progress(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        targets = labels
        if mixer is not None:   # CutMix/MixUp: float images, soft targets
            images, targets = mixer(images, labels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, targets, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        after_step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "images_per_s": count / seconds}


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set(title=title, xlabel="epoch")
        ax.legend()
    axes[2].plot(epochs, [h["lr"] for h in history], "o-")
    axes[2].set(title="learning rate", xlabel="epoch", yscale="log")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _setup_distributed(device_arg):
    """(rank, world size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if world > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    device = torch.device("cuda" if use_cuda else "cpu") if device_arg == "auto" else torch.device(device_arg)
    return 0, 1, device


def _start_tracking(mode, recipe, run_dir):
    mode = mode or os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: this run is not tracked (pip install wandb, or pass --wandb disabled)")
        return None
    return wandb.init(project="cifar100", name=recipe.name, config=dataclasses.asdict(recipe), mode=mode,
                      dir=str(run_dir), reinit="finish_previous")


def train(part, data_dir, out="runs", overrides=None, device="auto", resume=False, wandb_mode=None, workers=None,
          download=False, pause_after=None):
    """Train one recipe; returns the metrics dict (also written to OUT/PART/metrics.json). With pause_after, stop
    after that many epochs of this run, leaving last.pt for a `resume` (returns None then). WORKERS: data-loader
    processes per training process (None: default_workers())."""
    overrides = overrides or {}
    rank, world, device = _setup_distributed(device)
    run_dir = Path(out) / part
    recipe = RECIPES[part](**overrides)
    resumed = load_checkpoint(run_dir / "last.pt") if resume else None
    if resumed:  # the saved recipe, with what the command line changes (e.g. more --epochs)
        recipe = recipe_from_dict({**resumed["recipe"], **overrides})
    torch.manual_seed(recipe.seed)
    data = load_cifar100(data_dir, download=download)
    train_idx, val_idx = split_train_val(len(data.train_labels), recipe.val_fraction, recipe.seed)
    train_set = TrainingImages(data.train_images[train_idx], data.train_labels[train_idx], recipe)
    val_set = ImageDataset(data.train_images[val_idx], data.train_labels[val_idx])
    if world > 1:   # each rank validates its share; evaluate() adds them up
        val_set = Subset(val_set, range(rank, len(val_set), world))
    test_set = ImageDataset(data.test_images, data.test_labels)

    model = build_classifier(recipe).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batch_size = recipe.batch_size or find_batch_size(model, device, recipe.batch_size_cap)
    if world > 1:  # every rank must use the same batch size
        b = torch.tensor([batch_size], device=device)
        dist.all_reduce(b, op=dist.ReduceOp.MIN)
        batch_size = int(b)
    steps_per_epoch = len(train_set) // (batch_size * world) if world > 1 else math.ceil(len(train_set) / batch_size)
    optimizer = build_optimizer(recipe, model)
    scheduler = build_scheduler(recipe, optimizer, steps_per_epoch)
    # The moving average of the weights, when the recipe keeps one, is what is validated, checkpointed as best
    # and exported.
    ema = build_ema(recipe, model)
    judged = ema.module if ema is not None else model
    progress = {"epoch": 0, "history": [], "best_val_acc": -1.0, "best_val_loss": math.inf, "stale_epochs": 0}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        progress = resumed["progress"]
        log.info("resuming %s at epoch %d", part, progress["epoch"] + 1)
    stopper = EarlyStopping(recipe.early_stop_patience, progress["best_val_loss"], progress["stale_epochs"])
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    mixer, per_batch = batch_mixer(recipe), steps_per_batch(recipe)

    def after_step():
        if per_batch:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)

    workers = default_workers() if workers is None else workers
    # A generator of the loaders' own: the worker seeds they draw (once with persistent workers, else every epoch)
    # leave the training loop's random stream alone.
    loader_args = dict(batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                       generator=torch.Generator())
    # The workers persist across epochs; the sampler tells them the epoch (the augmentation and its randomness
    # follow it), so a resumed run repeats an uninterrupted one.
    sampler = EpochSampler(train_set, num_replicas=world, rank=rank, seed=recipe.seed)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=world > 1, persistent_workers=workers > 0,
                              **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, persistent_workers=workers > 0, **loader_args)
    test_loader = DataLoader(test_set, shuffle=False, **loader_args)
    tracker = _start_tracking(wandb_mode, recipe, run_dir) if rank == 0 else None
    log.info("%s: %s at %d px, batch %d x %d process(es), %d train / %d val / %d test images, on %s, %d loader "
             "workers per process", part, recipe.arch, recipe.resolution, batch_size, world, len(train_set),
             len(val_idx), len(test_set), device, workers)

    first_epoch = progress["epoch"]   # of this run (pause_after counts from it)
    for epoch in range(first_epoch, recipe.epochs):
        torch.manual_seed(epoch_seed(recipe.seed, epoch))
        sampler.set_epoch(epoch)
        bar = lambda it: tqdm(it, desc=f"{part} epoch {epoch + 1}/{recipe.epochs}", leave=False, disable=rank != 0)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(ddp_model, train_loader, optimizer, recipe, device, bar, mixer, after_step)
        if world > 1:
            same_on_every_rank(judged)
        val_loss, val_acc = evaluate(judged, val_loader, device, distributed=world > 1)
        if not per_batch:
            scheduler.step()
        stop = stopper.step(val_loss)
        row = {"epoch": epoch, "lr": lr, **stats, "val_loss": val_loss, "val_acc": val_acc}
        progress["history"].append(row)
        improved = val_acc > progress["best_val_acc"]
        progress.update(epoch=epoch + 1, best_val_loss=stopper.best, stale_epochs=stopper.stale,
                        best_val_acc=max(val_acc, progress["best_val_acc"]))
        log.info("%s epoch %d/%d: lr %.2e  train loss %.3f acc %.3f  val loss %.3f acc %.3f  %.0f img/s",
                 part, epoch + 1, recipe.epochs, lr, stats["train_loss"], stats["train_acc"], val_loss, val_acc,
                 stats["images_per_s"])
        if rank == 0:
            if tracker:
                tracker.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if improved:
                save_checkpoint(run_dir / "best.pt", checkpoint_state(
                    judged, recipe, data.classes, metrics={"epoch": epoch + 1, "val_acc": val_acc, "val_loss": val_loss}))
            save_checkpoint(run_dir / "last.pt", checkpoint_state(
                model, recipe, data.classes, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                progress=progress, **({"ema": ema.state_dict()} if ema is not None else {})))
        if stop:
            log.info("early stopping: validation loss has not improved for %d epochs", stopper.stale)
            break
        if pause_after is not None and progress["epoch"] < recipe.epochs and progress["epoch"] - first_epoch >= pause_after:
            log.info("%s: paused after epoch %d of %d; continue with --resume", part, progress["epoch"], recipe.epochs)
            if world > 1:
                dist.destroy_process_group()
            return None

    metrics = None
    if rank == 0:
        best = load_checkpoint(run_dir / "best.pt")
        judged.load_state_dict(best["model"])
        test_loss, test_acc = evaluate(judged, test_loader, device)
        history = progress["history"]
        metrics = {"part": part, "test_acc": test_acc, "test_loss": test_loss, "best_val_acc": progress["best_val_acc"],
                   "best_epoch": best["metrics"]["epoch"], "epochs_run": progress["epoch"],
                   "images_per_s": sum(h["images_per_s"] for h in history) / len(history),
                   "batch_size": batch_size, "world_size": world, "device": str(device),
                   "recipe": dataclasses.asdict(recipe)}
        best["metrics"].update(test_acc=test_acc, test_loss=test_loss)
        save_checkpoint(run_dir / "best.pt", best)
        write_json(run_dir / "metrics.json", metrics)
        plot_curves(history, run_dir / "curves.png")
        log.info("%s: test accuracy %.4f (best validation %.4f); wrote %s", part, test_acc,
                 progress["best_val_acc"], run_dir)
        if tracker:
            tracker.summary.update({"test_acc": test_acc})
            tracker.finish()
    if world > 1:
        dist.destroy_process_group()
    return metrics
