"""Training module: data format, preprocessing, models, recipes, the loop, checkpoints, torchrun."""
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from training.checkpoint import CheckpointError, load_checkpoint, load_classifier
from training.data import DataError, batch_mixer, build_transform, load_cifar100, split_train_val
from training.models import build_classifier
from training.preprocess import CIFAR100_MEAN, CIFAR100_STD, Preprocess
from training.models import FlipAveraged, head
from training.recipes import Part1, Part2, Part3, Robust, recipe_from_dict
from training.synthetic import write_dataset
from training.train import (EarlyStopping, build_ema, build_optimizer, build_scheduler, default_workers,
                            find_batch_size, train)

QUICK = dict(batch_size=64, epochs=2)
RUN = dict(device="cpu", wandb_mode="disabled", workers=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_dataset(root, per_class=12, test_per_class=4)
    return root


# --- data -----------------------------------------------------------------------------------------

def test_generated_files_are_in_the_official_format(data_dir):
    with open(data_dir / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"} <= raw.keys()
    assert raw["data"].dtype == np.uint8 and raw["data"].shape == (1200, 3072)
    with open(data_dir / "cifar-100-python" / "meta", "rb") as f:
        assert len(pickle.load(f, encoding="latin1")["fine_label_names"]) == 100
    data = load_cifar100(data_dir)
    assert data.train_images.shape == (1200, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (400, 32, 32, 3) and len(data.classes) == 100
    # Rows hold the red plane, then green, then blue: pixel (row 3, col 5) of image 7.
    assert tuple(data.train_images[7, 3, 5]) == tuple(raw["data"][7, [3 * 32 + 5, 1024 + 3 * 32 + 5, 2048 + 3 * 32 + 5]])
    assert list(data.train_labels) == raw["fine_labels"]


def test_reader_refuses_bad_files(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    with pytest.raises(DataError, match="no CIFAR-100"):
        load_cifar100(tmp_path)
    (root / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-100 python pickle"):
        load_cifar100(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (root / "train").write_bytes(pickle.dumps({"data": Exploit()}))
    with pytest.raises(DataError, match="unexpected object"):
        load_cifar100(tmp_path)


def test_validation_split_is_seeded_and_disjoint():
    train_a, val_a = split_train_val(1000, 0.1, seed=3)
    train_b, val_b = split_train_val(1000, 0.1, seed=3)
    assert len(val_a) == 100 and len(train_a) == 900
    assert set(train_a).isdisjoint(val_a) and set(train_a) | set(val_a) == set(range(1000))
    assert (val_a == val_b).all() and not (val_a == split_train_val(1000, 0.1, seed=4)[1]).all()
    assert len(split_train_val(1000, 0.25)[1]) == 250


def test_augmentation_per_part():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert build_transform(Part1(), 0) is None
    for recipe, epoch in ((Part2(), 0), (Part3(), 0), (Part3(), 30)):
        out = build_transform(recipe, epoch)(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    names = lambda t: [type(x).__name__ for x in t.transforms]
    assert names(build_transform(Part3(), 29)) == ["RandomCrop", "RandomHorizontalFlip"]
    assert names(build_transform(Part3(), 30)) == ["RandomCrop", "RandomHorizontalFlip", "RandomRotation",
                                                   "ColorJitter", "RandomErasing"]
    assert "ColorJitter" in names(build_transform(Part2(), 0))
    robust = names(build_transform(Robust(), 0))
    assert robust == ["RandomCrop", "RandomHorizontalFlip", "AugMix", "RandomApply", "RandomApply", "RandomApply"]
    always = build_transform(Robust(corrupt_p=1.0), 0)   # noise, JPEG and blur every time: still uint8 images
    out = always(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32) and not torch.equal(out, image)


# --- preprocessing and models ---------------------------------------------------------------------

def test_preprocess_normalises_and_resizes():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    out = Preprocess(32)(images)
    expected = (images.permute(0, 3, 1, 2) / 255 - torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)  # no copy for the GPU's preferred layout
    big = Preprocess(224)(images)
    assert big.shape == (2, 3, 224, 224)
    torch.testing.assert_close(big.mean((2, 3)), expected.mean((2, 3)), atol=0.02, rtol=0)
    torch.testing.assert_close(Preprocess(224)(images.float()), big)  # float pixels (mixup) too


def test_simple_cnn_shape_and_exact_parameter_count():
    model = build_classifier(Part1())
    # conv 3->32, 32->64, 64->128 (3x3 + bias), FC 2048->256, FC 256->100
    expected = (3 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + (2048 * 256 + 256) + (256 * 100 + 100)
    assert sum(p.numel() for p in model.parameters()) == expected == 643_492
    assert model(torch.zeros(5, 32, 32, 3, dtype=torch.uint8)).shape == (5, 100)
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm2d)) for m in model.modules())


def test_resnet_heads_and_counts():
    r18 = build_classifier(Part2())
    assert [type(m) for m in r18.net.fc] == [nn.Dropout, nn.Linear] and r18.net.fc[0].p == 0.5
    assert sum(p.numel() for p in r18.parameters()) == 11_227_812
    assert r18.preprocess.resolution == 224
    r50 = build_classifier(Part3(weights="none"))
    assert [type(m) for m in r50.net.fc] == [nn.Dropout, nn.BatchNorm1d, nn.Linear]
    assert r50.net.fc[2].in_features == 2048 and r50.net.fc[2].out_features == 100
    assert sum(p.numel() for p in r50.parameters()) == 23_717_028
    r50.eval()
    assert r50(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 100)


def test_freeze_rule_trains_exactly_the_last_50_tensors():
    model = build_classifier(Part3(weights="none"))
    flags = [p.requires_grad for p in model.parameters()]
    assert len(flags) == 163 and flags == [False] * 113 + [True] * 50
    optimizer = build_optimizer(Part3(weights="none"), model)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 50
    assert all(p.requires_grad for p in build_classifier(Part2()).parameters())


def test_recipes_name_their_imagenet_weights_and_old_checkpoints_still_load():
    assert (Part3().weights, Robust().weights) == ("IMAGENET1K_V1", "IMAGENET1K_V2")  # the report's pretrained=True: V1
    old = {**dataclasses.asdict(Part3()), "weights": "imagenet"}   # as checkpoints said before: V2 in fact
    del old["head_lr_mult"], old["ema_decay"]                      # fields added since
    assert recipe_from_dict(old) == Part3(weights="IMAGENET1K_V2")
    assert Robust().trainable_tail is None and Robust().schedule == "warmup_cosine"   # every layer trains


def test_the_heads_learning_rate_is_a_multiple():
    model = build_classifier(Robust(weights="none", arch="simple_cnn", resolution=32))
    optimizer = build_optimizer(Robust(arch="simple_cnn", lr=0.001, head_lr_mult=10), model)
    body, top = optimizer.param_groups
    assert (body["lr"], top["lr"]) == (0.001, pytest.approx(0.01))
    assert {id(p) for p in top["params"]} == {id(p) for p in head(model.net).parameters()}
    assert len(body["params"]) + len(top["params"]) == len(list(model.parameters()))


def test_flip_averaging_is_the_mean_over_the_image_and_its_mirror():
    model = build_classifier(Part1()).eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(2))) / 2
        torch.testing.assert_close(FlipAveraged(model)(images), expected)
        assert not torch.allclose(model(images), expected)


def test_imagenet_weights_unavailable_is_a_clear_error(tmp_path, monkeypatch):
    from training.models import WeightsUnavailable
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; no internet on CI either
    try:
        model = build_classifier(Part3())
    except WeightsUnavailable as e:
        assert "--weights none" in str(e)
    else:  # reachable: then they really are ImageNet weights
        assert model.net.conv1.weight.abs().sum() > 0


# --- recipes: schedules, mixup, early stopping, batch size -----------------------------------------

def lr_curve(recipe, epochs):
    optimizer = build_optimizer(recipe, nn.Linear(2, 2))
    scheduler = build_scheduler(recipe, optimizer)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_learning_rate_curves():
    assert lr_curve(Part1(), 5) == pytest.approx([0.01 * 0.9 ** e for e in range(5)])

    p2 = Part2()
    cosine = [p2.min_lr + (p2.lr - p2.min_lr) * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert lr_curve(p2, 5) == pytest.approx(cosine)

    p3 = Part3(weights="none")
    lrs = lr_curve(p3, 40)
    warm = [p3.lr * (1 / 6 + (5 / 6) * e / 5) for e in range(5)]
    assert lrs[:5] == pytest.approx(warm)            # linear warm-up to the peak
    assert lrs[5] == pytest.approx(p3.lr)            # cosine cycle 1: epochs 5..14 (T_0 = 10)
    assert lrs[10] == pytest.approx(p3.min_lr + (p3.lr - p3.min_lr) / 2)
    assert lrs[14] < 0.03 * p3.lr
    assert lrs[15] == pytest.approx(p3.lr)           # warm restart; cycle 2 lasts 20 epochs
    assert lrs[35] == pytest.approx(p3.lr) and lrs[34] < lrs[33] < lrs[15]


def test_warmup_cosine_is_stepped_per_batch():
    recipe = Robust(lr=0.1, min_lr=0.001, warmup_epochs=1, epochs=3, head_lr_mult=1)
    optimizer = build_optimizer(recipe, build_classifier(Robust(arch="simple_cnn", resolution=32, weights="none")))
    scheduler = build_scheduler(recipe, optimizer, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:10] == pytest.approx([0.1 * (s + 1) / 10 for s in range(10)])   # one epoch of linear warm-up
    assert lrs[10] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.001 + 0.099 / 2)   # one cosine decay
    assert lrs[29] == pytest.approx(0.001, abs=0.002) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))


def test_batch_mixing_blends_images_and_labels_alike():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(8)
    assert batch_mixer(Part1()) is None
    mixed, targets = batch_mixer(Part3())(images, labels)   # MixUp: image i blended with its neighbour
    assert mixed.dtype == torch.float32 and mixed.shape == images.shape and targets.shape == (8, 100)
    lam = float(targets[0, 0])
    torch.testing.assert_close(mixed, lam * images.float() + (1 - lam) * images.float().roll(1, 0))
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    cut, targets = batch_mixer(Robust(mixup_alpha=0))(images, labels)   # CutMix: a box of the neighbour
    pasted = (cut != images.float()).any(-1).float().mean((1, 2))         # share of pixels replaced, per image
    assert abs(float(targets[0, 0]) - (1 - float(pasted[0]))) < 0.01   # the label weight is the kept area


def test_early_stopping():
    stopper = EarlyStopping(patience=3)
    assert [stopper.step(v) for v in (1.0, 0.9, 0.95, 0.91, 0.92)] == [False, False, False, False, True]
    never = EarlyStopping(patience=None)
    assert not any(never.step(1.0) for _ in range(100))


def test_the_weight_average_warms_up_and_reaches_the_recipes_decay():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = build_ema(Robust(ema_decay=0.999), model)
    ema.update_parameters(model)   # the first update copies the weights
    nn.init.ones_(model.weight)
    steps = 300
    for _ in range(steps):
        ema.update_parameters(model)
    lag = math.prod(min(0.999, (1 + t) / (30 + t)) for t in range(1, steps + 1))   # what is left of the first weights
    assert ema.module.weight.item() == pytest.approx(1 - lag, abs=1e-6)
    assert lag < 1e-6 < 0.999 ** steps / 1e5   # a fixed 0.999 would still hold 74% of the first weights
    # Long runs reach the recipe's decay: after 100,000 updates, one more moves the average by 1 - 0.999.
    ema.n_averaged.fill_(100_000)
    nn.init.constant_(model.weight, 2.0)
    before = ema.module.weight.item()
    ema.update_parameters(model)
    assert ema.module.weight.item() - before == pytest.approx((2.0 - before) * 0.001, rel=1e-4)


def test_loader_workers_default_to_the_cores_of_each_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")    # torchrun: two processes share the 16 cores
    assert default_workers() == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 1


def test_batch_size_finder_on_cpu_is_the_largest_power_of_two_under_the_cap():
    model = build_classifier(Part1())
    assert find_batch_size(model, torch.device("cpu"), 256) == 256
    assert find_batch_size(model, torch.device("cpu"), 300) == 256


# --- the training loop ----------------------------------------------------------------------------

def test_resume_repeats_the_uninterrupted_run(data_dir, tmp_path):
    train("part1", data_dir, tmp_path / "full", dict(QUICK, epochs=3), **RUN)
    # A 1-epoch run, extended to 3 and paused after one more epoch (a resumed run pauses too), then finished.
    train("part1", data_dir, tmp_path / "split", dict(QUICK, epochs=1), **RUN)
    split_last = tmp_path / "split" / "part1" / "last.pt"
    assert train("part1", data_dir, tmp_path / "split", dict(QUICK, epochs=3), resume=True, pause_after=1, **RUN) is None
    assert load_checkpoint(split_last)["progress"]["epoch"] == 2
    train("part1", data_dir, tmp_path / "split", dict(QUICK, epochs=3), resume=True, **RUN)
    full, split = (load_checkpoint(tmp_path / d / "part1" / "last.pt") for d in ("full", "split"))
    assert split["progress"]["epoch"] == full["progress"]["epoch"] == 3
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    timeless = lambda h: [{k: v for k, v in row.items() if k != "images_per_s"} for row in h["progress"]["history"]]
    assert timeless(split) == timeless(full)  # same losses, accuracies and learning rates, epoch by epoch
    assert split["optimizer"]["state"][0]["momentum_buffer"].equal(full["optimizer"]["state"][0]["momentum_buffer"])


def test_checkpoint_round_trip(data_dir, tmp_path):
    train("part1", data_dir, tmp_path, dict(QUICK, epochs=1), **RUN)
    model, ckpt = load_classifier(tmp_path / "part1" / "best.pt")
    assert ckpt["classes"][:2] == ["class_00", "class_01"] and ckpt["recipe"]["name"] == "part1"
    assert ckpt["preprocess"]["mean"] == list(CIFAR100_MEAN) and "test_acc" in ckpt["metrics"]
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    fresh = build_classifier(Part1())
    fresh.load_state_dict(torch.load(tmp_path / "part1" / "best.pt", weights_only=True)["model"])
    torch.testing.assert_close(model(images), fresh.eval()(images), rtol=0, atol=0)
    (tmp_path / "broken.pt").write_bytes((tmp_path / "part1" / "best.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_classifier(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_classifier(tmp_path / "missing.pt")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model": Exploit(), "recipe": {}, "classes": []}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused by weights_only=True"):
        load_classifier(tmp_path / "evil.pt")


def test_part3_pipeline_runs_with_mixup_staging_and_early_stop(tmp_path):
    # Part 3's machinery (frozen backbone, mixup, clipping, staged augmentation, early stopping) at 32 px,
    # on 300 images: a ResNet-50 is slow on 2 cores.
    data_dir = tmp_path / "data"
    write_dataset(data_dir, per_class=3, test_per_class=1)
    overrides = dict(weights="none", resolution=32, epochs=4, batch_size=64, early_stop_patience=1,
                     strong_augment_from=1, warmup_epochs=1, lr=0.05, val_fraction=0.3)
    torch.manual_seed(overrides.get("seed", 0))  # train() builds the model right after this same seeding
    initial = build_classifier(Part3(**overrides)).state_dict()
    metrics = train("part3", data_dir, tmp_path, overrides, **RUN)
    losses = [h["val_loss"] for h in load_checkpoint(tmp_path / "part3" / "last.pt")["progress"]["history"]]
    # With patience 1, the run ends at the first epoch whose validation loss is not a new minimum.
    stale = [i for i in range(1, len(losses)) if losses[i] >= min(losses[:i])]
    assert metrics["epochs_run"] == len(losses) == (stale[0] + 1 if stale else 4)
    trained = load_checkpoint(tmp_path / "part3" / "best.pt")["model"]
    names = [n for n, _ in build_classifier(Part3(**overrides)).named_parameters()]
    changed = [n for n in names if not torch.equal(initial[n], trained[n])]
    assert changed and set(changed) <= set(names[-50:])  # the frozen backbone did not move


def test_robust_recipe_runs_end_to_end_small_and_resumes_exactly(data_dir, tmp_path):
    # The robust machinery (AugMix and friends, CutMix/MixUp, per-batch warm-up + cosine, two learning rates,
    # EMA) with a small network at 32 px.
    small = dict(arch="simple_cnn", weights="none", resolution=32, epochs=2, batch_size=64, warmup_epochs=0.5,
                 corrupt_p=0.5, ema_decay=0.9)
    metrics = train("robust", data_dir, tmp_path / "full", dict(small), **RUN)
    # Interrupted after its first epoch (the schedule spans the whole run, so not a shorter run), then resumed.
    assert train("robust", data_dir, tmp_path / "split", dict(small), pause_after=1, **RUN) is None
    train("robust", data_dir, tmp_path / "split", dict(small), resume=True, **RUN)
    full, split = (load_checkpoint(tmp_path / d / "robust" / "last.pt") for d in ("full", "split"))
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    for key, value in full["ema"].items():       # the average resumes exactly too
        assert torch.equal(value, split["ema"][key]), key
    best = load_checkpoint(tmp_path / "full" / "robust" / "best.pt")
    ema_weights = {k.removeprefix("module."): v for k, v in full["ema"].items() if k.startswith("module.")}
    if best["metrics"]["epoch"] == 2:   # the best checkpoint holds the averaged weights, not the trained ones
        assert all(torch.equal(best["model"][k], ema_weights[k]) for k in best["model"])
    assert not all(torch.equal(full["model"][k], ema_weights[k]) for k in full["model"])
    lrs = [h["lr"] for h in full["progress"]["history"]]
    assert lrs[0] < lrs[1] and metrics["epochs_run"] == 2 and 0 <= metrics["test_acc"] <= 1
    # Two persistent loader workers augment each image as the main process does, epoch after epoch.
    train("robust", data_dir, tmp_path / "workers", dict(small), **{**RUN, "workers": 2})
    two_workers = load_checkpoint(tmp_path / "workers" / "robust" / "last.pt")
    assert all(torch.equal(value, two_workers["model"][key]) for key, value in full["model"].items())


def test_without_wandb_the_run_warns_once_and_goes_on(data_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    metrics = train("part1", data_dir, tmp_path, dict(QUICK, epochs=1), **{**RUN, "wandb_mode": "offline"})
    assert metrics["epochs_run"] == 1 and (tmp_path / "part1" / "best.pt").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["wandb is not installed: this run is not tracked (pip install wandb, or pass --wandb disabled)"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_part1_command_reaches_far_above_chance(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, per_class=60, test_per_class=10)
    result = run_cli("part1", "--data-dir", str(data), "--out", str(tmp_path / "runs"), "--epochs", "3",
                     "--batch-size", "64", "--workers", "0", "--wandb", "offline", env={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "part1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_acc"] > 0.3, metrics  # chance is 0.01
    assert metrics["epochs_run"] == 3 and metrics["images_per_s"] > 0 and metrics["best_val_acc"] > 0.3
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "wandb").glob("offline-run-*")), "wandb did not log offline"
    assert not list(run.glob(".*.tmp")), "temporary files left behind"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from training.__main__ import main   # in this process: what `sys.exit(message)` would print, one line

    def error(*args):
        with pytest.raises(SystemExit) as done:
            main([*args, "--wandb", "disabled"])
        return done.value.code
    message = error("part1", "--data-dir", str(tmp_path))
    assert message.startswith("error: no CIFAR-100 at") and "\n" not in message
    assert error("part1", "--data-dir", str(tmp_path), "--resume", "--out", str(tmp_path)).startswith(
        "error: no checkpoint at")
    assert error("part1", "--data-dir", str(tmp_path), "--lr", "fast") == 2 and "--lr" in capsys.readouterr().err


def test_help_shows_each_recipe_option_with_its_meaning_and_the_parts_default(capsys):
    from training.__main__ import parse_args
    for part, lr in (("part1", "0.01"), ("part3", "0.001")):
        with pytest.raises(SystemExit):
            parse_args([part, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"--lr FLOAT learning rate (the peak, after any warm-up) (default: {lr})" in text
        assert "--grad-clip FLOAT clip the gradient norm to this; none: no clipping" in text
    part, run, overrides = parse_args(["part3", "--data-dir", "d", "--lr", "0.5", "--grad-clip", "none"])
    assert part == "part3" and run["data_dir"] == "d" and overrides == {"lr": 0.5, "grad_clip": None}


SKEWED_RANKS = """
import json, os, sys
import torch
import torch.distributed as dist
import training.train as loop
from training.__main__ import main

losses, train_one_epoch, evaluate = [], loop.train_one_epoch, loop.evaluate


def skewed(model, *args, **kwargs):   # rank 1's BatchNorm statistics drift far from rank 0's after every epoch
    stats = train_one_epoch(model, *args, **kwargs)
    if dist.get_rank() == 1:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(10.0 ** (len(losses) + 1))
    return stats


def recorded(model, *args, **kwargs):   # the validation loss, and a fingerprint of the model validated
    loss, acc = evaluate(model, *args, **kwargs)
    if kwargs.get("distributed"):   # validation (rank 0 tests the best model alone at the end)
        losses.append([loss, sum(t.double().sum().item() for t in model.state_dict().values())])
    return loss, acc


loop.train_one_epoch, loop.evaluate = skewed, recorded
main(sys.argv[2:])
with open(sys.argv[1] + f"/rank{os.environ['RANK']}.json", "w") as f:
    json.dump(losses, f)
"""


def test_torchrun_ranks_validate_the_same_model_and_stop_together(data_dir, tmp_path):
    # Two CPU processes (gloo), ResNet-18 at 32 px with early stopping (patience 1). Rank 1's BatchNorm statistics
    # are pushed far from rank 0's after every epoch: left alone, the ranks would validate different models,
    # stop at different epochs, and one would wait for the other forever.
    (tmp_path / "skewed.py").write_text(SKEWED_RANKS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "skewed.py"), str(tmp_path), "part2", "--data-dir", str(data_dir), "--out",
               str(tmp_path), "--resolution", "32", "--epochs", "4", "--batch-size", "32", "--early-stop-patience",
               "1", "--lr", "0.01", "--workers", "0", "--wandb", "disabled", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        pytest.fail("the ranks did not finish together: one waits for the other")
    assert process.returncode == 0, stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    metrics = json.loads((tmp_path / "part2" / "metrics.json").read_text())
    assert rank0 == rank1 and len(rank0) == metrics["epochs_run"]   # the same model and loss, the same stop
    assert metrics["world_size"] == 2 and stderr.count("test accuracy") == 1  # only rank 0 evaluates and writes
