"""Tests for vit.py: CPU only, about a minute. Run: python -m pytest test_vit.py"""
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer

import vit

PETS3 = Path(__file__).resolve().parent.parent / "shared" / "data" / "pets3"
TINY = ["--image-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "2",
        "--mlp-dim", "64", "--batch-size", "32", "--workers", "0", "--fake-data"]
# the history less its timings
DETERMINISTIC = ("train_loss", "lr", "test_epoch", "test_loss", "test_acc")


def tiny_vit(**changes):
    config = dict(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64)
    return vit.ViT(**(config | changes))


def random_torchvision_vit(**changes):
    torch.manual_seed(0)
    config = dict(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=64,
                  mlp_dim=128, num_classes=7)
    tv = VisionTransformer(**(config | changes)).eval()
    # its head, positions and biases start at zero: randomise everything
    with torch.no_grad():
        for param in tv.parameters():
            param.normal_(0, 0.2)
    return tv


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, as in CI, also on a machine that has one; and no cached torch weights."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


# ---------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("image_size, patch_size, channels, heads, depth",
                         [(32, 8, 3, 2, 2), (28, 7, 1, 4, 1), (48, 16, 3, 1, 3), (16, 16, 1, 2, 1)])
def test_output_shape(image_size, patch_size, channels, heads, depth):
    model = tiny_vit(image_size=image_size, patch_size=patch_size, channels=channels, heads=heads,
                     depth=depth)
    assert model(torch.randn(3, channels, image_size, image_size)).shape == (3, 5)
    logits, weights = model(torch.randn(2, channels, image_size, image_size), return_weights=True)
    n = (image_size // patch_size) ** 2 + 1
    assert logits.shape == (2, 5)
    assert [w.shape for w in weights] == [(2, heads, n, n)] * depth


def test_patch_embedding_is_a_strided_convolution():
    embed = vit.PatchEmbedding(image_size=32, patch_size=8, channels=3, dim=24)
    conv = nn.Conv2d(3, 24, kernel_size=8, stride=8)
    conv.weight.data = embed.proj.weight.data.view(24, 3, 8, 8)  # (c, p1, p2) order
    conv.bias.data = embed.proj.bias.data
    x = torch.randn(4, 3, 32, 32)
    expected = conv(x).flatten(2).transpose(1, 2)  # (b, n, dim), patches row by row
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)


def test_explicit_attention_equals_fused_attention():
    attn = vit.Attention(dim=48, heads=4).eval()
    x = torch.randn(3, 17, 48)
    fused, none = attn(x)
    explicit, weights = attn(x, return_weights=True)
    assert none is None and weights.shape == (3, 4, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 17))
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_from_torchvision_gives_the_same_logits():
    tv = random_torchvision_vit()
    model = vit.from_torchvision(tv).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x), tv(x)
    assert (ours - theirs).norm() / theirs.norm() < 1e-5
    assert model.config == dict(image_size=32, patch_size=8, num_classes=7, dim=64, depth=3,
                                heads=4, mlp_dim=128, channels=3)
    fresh = vit.from_torchvision(tv, num_classes=37)
    assert fresh.head.out_features == 37 and fresh.config["num_classes"] == 37
    assert fresh.head.weight.abs().sum() == 0


def test_from_torchvision_refuses_models_it_cannot_copy():
    from torchvision.models.vision_transformer import ConvStemConfig
    stem = [ConvStemConfig(out_channels=64, kernel_size=3, stride=8)]
    with pytest.raises(ValueError, match="patch convolution and a linear head"):
        vit.from_torchvision(random_torchvision_vit(conv_stem_configs=stem))
    with pytest.raises(ValueError, match="patch convolution and a linear head"):
        vit.from_torchvision(random_torchvision_vit(representation_size=16))
    with pytest.raises(ValueError, match="patch convolution and a linear head"):
        vit.from_torchvision(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        vit.from_torchvision(random_torchvision_vit(), num_classes=0)
    tv = random_torchvision_vit()
    tv.encoder.pos_embedding = nn.Parameter(torch.zeros(1, 5, 64))  # 4 patches, not 16
    with pytest.raises(ValueError, match=r"encoder.pos_embedding is \(1, 5, 64\), our "
                                         r"pos_embedding \(1, 17, 64\)"):
        vit.from_torchvision(tv)


def test_every_parameter_gets_a_gradient_and_a_tiny_batch_is_learned():
    torch.manual_seed(0)
    model = tiny_vit()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(x).argmax(-1) == y).all()


@pytest.mark.parametrize("changes, message", [
    (dict(image_size=30), "patch_size 8 does not divide image_size 30"),
    (dict(dim=30, heads=4), "heads 4 does not divide dim 30"),
    (dict(patch_size=0), "patch_size must be a positive integer, got 0"),
    (dict(heads=0), "heads must be a positive integer, got 0"),
    (dict(depth=0), "depth must be a positive integer, got 0"),
    (dict(dim=-32), "dim must be a positive integer, got -32"),
    (dict(mlp_dim=64.0), "mlp_dim must be a positive integer, got 64.0"),
    (dict(num_classes=True), "num_classes must be a positive integer, got True"),
])
def test_bad_sizes_raise_value_errors_naming_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_vit(**changes)


def test_each_class_checks_its_own_sizes():
    with pytest.raises(ValueError, match="patch_size 0 does not divide image_size 32"):
        vit.PatchEmbedding(32, 0, 3, 8)
    with pytest.raises(ValueError, match="heads 0 does not divide dim 32"):
        vit.Attention(32, 0)


@pytest.mark.parametrize("images, message", [
    (torch.randn(3, 32, 32), r"\(batch, 3, 32, 32\), got torch.float32 \(3, 32, 32\)"),
    (torch.randn(2, 1, 32, 32), r"got torch.float32 \(2, 1, 32, 32\)"),
    (torch.randn(2, 3, 64, 64), r"got torch.float32 \(2, 3, 64, 64\)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "got torch.uint8 .* vit.normalise converts"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.float64), "expected torch.float32 .* got torch.float64"),
])
def test_bad_batches_raise_value_errors(images, message):
    with pytest.raises(ValueError, match=message):
        tiny_vit()(images)


def test_attention_rollout_maps_sum_to_one_over_the_patches():
    _, weights = tiny_vit()(torch.randn(3, 3, 32, 32), return_weights=True)
    maps = vit.attention_rollout(weights)
    assert maps.shape == (3, 4, 4) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(3))


# ----------------------------------------------------------------------------------------- data

def write_pet(root):
    """A small Pet in torchvision's layout, its quirks included: a grayscale JPEG, and an RGBA and a
    palette image that are PNGs named .jpg. Returns the trainval and test image names."""
    images = root / "oxford-iiit-pet" / "images"
    annotations = root / "oxford-iiit-pet" / "annotations"
    images.mkdir(parents=True)
    annotations.mkdir()
    generator = torch.Generator().manual_seed(0)
    splits = {"trainval": [], "test": []}
    files = [("Abyssinian_1", 1, "RGB"), ("Abyssinian_2", 1, "L"), ("Bengal_1", 6, "RGBA"),
             ("american_bulldog_1", 2, "RGB"), ("Bengal_2", 6, "P"),
             ("american_bulldog_2", 2, "RGB")]
    for i, (name, class_id, mode) in enumerate(files):
        pixels = torch.randint(0, 256, (40 + 9 * i, 50, 3), dtype=torch.uint8, generator=generator)
        kind = "JPEG" if mode in ("RGB", "L") else "PNG"
        Image.fromarray(pixels.numpy()).convert(mode).save(images / f"{name}.jpg", kind)
        split = "test" if i >= 4 else "trainval"
        splits[split].append(name)
        with open(annotations / f"{split}.txt", "a") as f:
            f.write(f"{name} {class_id} {2 if 'bulldog' in name else 1} 1\n")
    return splits


def test_pet_is_decoded_to_rgb_tensors_with_breed_names(tmp_path):
    names = write_pet(tmp_path)["trainval"]
    images, labels, breeds = vit.load_data(tmp_path, "trainval", 32, workers=0)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert labels.tolist() == [0, 0, 5, 1]  # Pet's class ids less one: the head needs all 37
    assert breeds == {0: "Abyssinian", 1: "American Bulldog", 5: "Bengal"}
    for image, name in zip(images, names):  # exactly the decoded, resized, centre-cropped images
        pil = Image.open(tmp_path / "oxford-iiit-pet" / "images" / f"{name}.jpg").convert("RGB")
        assert torch.equal(image, TF.pil_to_tensor(TF.center_crop(TF.resize(pil, 32), 32)))
    assert torch.equal(images[1][0], images[1][2])  # the grayscale image, as RGB
    assert not list(tmp_path.glob("*.pt"))  # decoded into memory only: no cache to go stale


@pytest.mark.skipif(not PETS3.exists(), reason="../shared/data/pets3 is not beside this checkout")
def test_real_pet_slice_loads(tmp_path):
    (tmp_path / "oxford-iiit-pet").symlink_to(PETS3 / "oxford-iiit-pet")
    images, labels, breeds = vit.load_data(tmp_path, "test", 48, workers=2)
    assert images.shape == (298, 3, 48, 48) and sorted(set(labels.tolist())) == [0, 1, 5]
    assert breeds == {0: "Abyssinian", 1: "American Bulldog", 5: "Bengal"}
    assert 60 < images.float().mean() < 190 and images.float().std() > 30  # real pictures


def test_batches_augment_for_training_and_keep_each_label_with_its_image():
    torch.manual_seed(0)
    # image i is flat grey 25 i, with label 20 + i
    images = (torch.arange(10, dtype=torch.uint8) * 25).view(10, 1, 1, 1).expand(10, 3, 16, 16)
    labels = torch.arange(10) + 20
    mean, std = torch.tensor(vit.MEAN).view(3, 1, 1), torch.tensor(vit.STD).view(3, 1, 1)
    (x, y), = vit.batches(images, labels, 10, train=True)
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.tolist()) == labels.tolist()  # shuffled, every image once
    grey = ((y - 20) * 25.0).view(10, 1, 1, 1).expand(10, 3, 16, 16)
    torch.testing.assert_close((x * std + mean) * 255, grey, atol=1e-3, rtol=0)
    (x, y), = vit.batches(images, labels, 10)  # evaluation: in order, not augmented
    torch.testing.assert_close((x * std + mean) * 255, images.float(), atol=1e-3, rtol=0)
    assert torch.equal(y, labels)
    assert len(list(vit.batches(images, labels, 4, train=True))) == 2  # whole batches only
    assert [len(y) for _, y in vit.batches(images, labels, 4)] == [4, 4, 2]  # every test image
    ramp = torch.linspace(-1, 1, 16).expand(8, 3, 16, 16)
    crops = vit.augment(ramp)
    assert crops.shape == ramp.shape and crops.min() >= -1 and crops.max() <= 1
    changed = [not torch.allclose(crop, ramp[0], atol=1e-2) for crop in crops]
    assert sum(changed) >= 6  # nearly every image is cropped or mirrored


def test_mixer_blends_images_and_targets_in_the_same_proportion():
    values = torch.arange(8.0)  # image i is flat grey i and has label i
    images = values.view(8, 1, 1, 1).expand(8, 3, 12, 12)
    mix = vit.mixer(num_classes=10)
    kinds = set()
    for seed in range(20):  # both, mixup and cutmix, come up
        torch.manual_seed(seed)
        x, target = mix(images, torch.arange(8))
        assert x.shape == images.shape and target.shape == (8, 10) and target[:, 8:].eq(0).all()
        torch.testing.assert_close(target.sum(-1), torch.ones(8))
        torch.testing.assert_close(x.mean((1, 2, 3)), target[:, :8] @ values)  # pixel shares
        kinds.add("cutmix" if torch.isin(x, values).all() else "mixup")  # cutmix moves pixels
    assert kinds == {"mixup", "cutmix"}
    assert torch.equal(images, values.view(8, 1, 1, 1).expand(8, 3, 12, 12))  # input untouched


# ------------------------------------------------------------------------------------- training

def test_lr_warms_up_from_above_zero_to_the_peak_then_follows_a_cosine():
    lrs = [vit.lr_at(step, 1.0, warmup_steps=4, total_steps=20) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # the peak at the last warm-up step
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert 0 < lrs[-1] < 0.01
    assert vit.lr_at(0, 1.0, warmup_steps=0, total_steps=1) == 1.0  # a one-step run learns


def test_a_run_of_one_step_changes_the_weights():
    torch.manual_seed(0)
    model = tiny_vit()
    before = [p.clone() for p in model.parameters()]
    data = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 5)
    history = vit.train(model, data, data, epochs=1, batch_size=8)
    assert history["lr"] == [3e-4] and len(history["test_acc"]) == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_test_split_is_scored_every_few_epochs_and_after_the_last(capsys, monkeypatch):
    torch.manual_seed(0)
    data = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 5)
    history = vit.train(tiny_vit(), data, data, epochs=7, batch_size=8, test_every=3)
    assert history["test_epoch"] == [3, 6, 7]
    assert len(history["test_loss"]) == len(history["test_acc"]) == 3
    assert len(history["train_loss"]) == len(history["lr"]) == 7
    # a line in the log for each epoch, with the test's figures where there was one
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == [f"{epoch}/7" for epoch in range(1, 8)]
    assert [i + 1 for i, line in enumerate(lines) if "test acc" in line] == [3, 6, 7]
    figures = []
    monkeypatch.setattr(vit, "save_figure", lambda figure, path: figures.append(figure))
    vit.plot_history(history, "loss.png")  # not written: save_figure only keeps the figure
    loss_axis, accuracy_axis = figures[0].axes
    assert list(loss_axis.lines[0].get_xdata()) == list(range(1, 8))  # train loss, per epoch
    assert list(loss_axis.lines[1].get_xdata()) == [3, 6, 7]  # test loss, per test
    assert list(accuracy_axis.lines[0].get_ydata()) == history["test_acc"]
    with pytest.raises(ValueError, match="test_every must be a positive integer, got 0"):
        vit.train(tiny_vit(), data, data, epochs=1, batch_size=8, test_every=0)


# ---------------------------------------------------------------------------------- command line

def run(tmp_path, *args):
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    vit.main([*TINY, "--out-dir", out, "--data-dir", data, *args])
    return torch.load(tmp_path / "out" / "vit.pt", weights_only=True)


def refuse_to_decode(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded data although the run should have stopped before")
    monkeypatch.setattr(vit, "load_data", fail)


def test_cli_writes_plots_and_a_checkpoint_with_every_option(tmp_path):
    checkpoint = run(tmp_path, "--epochs", "2")
    for name in ("patches.png", "loss.png", "attention.png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 300
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "attention.png", "loss.png", "patches.png", "vit.pt"]  # no .tmp, no probe left
    model = vit.ViT(**checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 37)
    assert len(checkpoint["history"]["train_loss"]) == 2
    assert checkpoint["history"]["test_epoch"] == [2]  # the last epoch is always tested
    assert all(0 <= a <= 1 for a in checkpoint["history"]["test_acc"])
    assert checkpoint["options"].keys() == vit.DEFAULTS.keys()
    assert checkpoint["options"]["batch_size"] == 32 and checkpoint["options"]["fake_data"]
    # absolute, so that --resume finds the data from any folder
    assert checkpoint["options"]["data_dir"] == str(tmp_path / "data")


def test_same_seed_same_history(tmp_path):
    first = run(tmp_path / "a", "--epochs", "2", "--seed", "3")["history"]
    second = run(tmp_path / "b", "--epochs", "2", "--seed", "3")["history"]
    other = run(tmp_path / "c", "--epochs", "2", "--seed", "4")["history"]
    assert all(first[k] == second[k] for k in DETERMINISTIC)
    assert first["train_loss"] != other["train_loss"]


def test_interrupted_run_resumes_with_its_own_options_to_the_same_history(tmp_path, monkeypatch,
                                                                         capsys):
    uninterrupted = run(tmp_path / "whole", "--epochs", "3")["history"]
    train_step, calls = vit.train_step, []

    def interrupt_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 8 + 3:  # 8 steps an epoch
            raise KeyboardInterrupt
        return train_step(*args)
    monkeypatch.setattr(vit, "train_step", interrupt_in_epoch_two)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "cut", "--epochs", "3")
    assert exit.value.code == 130
    out = tmp_path / "cut" / "out"
    message = f"interrupted: {out}/vit.pt keeps 1 of 3 epochs, --resume goes on"
    assert message in capsys.readouterr().err
    saved = torch.load(out / "vit.pt", weights_only=True)
    assert len(saved["history"]["train_loss"]) == 1 and (out / "loss.png").exists()
    monkeypatch.setattr(vit, "train_step", train_step)
    # only where things are: every other option comes from the checkpoint
    vit.main(["--out-dir", str(out), "--resume", "--workers", "0", "--epochs", "3"])
    resumed = torch.load(out / "vit.pt", weights_only=True)["history"]
    assert all(resumed[k] == uninterrupted[k] for k in DETERMINISTIC)
    assert "keeps 1 of 3 epochs, --resume goes on" not in capsys.readouterr().err
    vit.main(["--out-dir", str(out), "--resume"])
    assert "is a finished run of 3 epochs: there is nothing to resume" in capsys.readouterr().out


def test_ctrl_c_while_testing_keeps_the_epochs_saved_and_says_so(tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(vit, "evaluate", interrupt)  # the first test is after the last epoch
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--epochs", "3")
    assert exit.value.code == 130
    assert "keeps 2 of 3 epochs, --resume goes on" in capsys.readouterr().err
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)["history"]
    assert len(saved["train_loss"]) == 2 and saved["test_epoch"] == []


@pytest.mark.parametrize("option, message", [
    (["--epochs", "5"], "--epochs 5 differs from the resumed run's 3"),
    (["--lr", "0.001"], "--lr 0.001 differs from the resumed run's 0.0003"),
    (["--fake-data", "--compile"], "--compile True differs from the resumed run's False"),
])
def test_resume_refuses_options_that_differ_from_the_run(tmp_path, monkeypatch, capsys, option,
                                                         message):
    checkpoint = run(tmp_path, "--epochs", "1")
    checkpoint["options"]["epochs"] = 3  # as if stopped after one of three epochs
    torch.save(checkpoint, tmp_path / "out" / "vit.pt")
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        vit.main(["--out-dir", str(tmp_path / "out"), "--resume", "--data-dir", "elsewhere",
                  *option])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_checkpoint_of_the_older_vit_py_that_tested_every_epoch_resumes(tmp_path):
    checkpoint = run(tmp_path, "--epochs", "1")
    checkpoint["options"]["epochs"] = 3  # as if stopped after one of three epochs
    del checkpoint["history"]["test_epoch"]
    torch.save(checkpoint, tmp_path / "out" / "vit.pt")
    vit.main(["--out-dir", str(tmp_path / "out"), "--resume", "--workers", "0"])
    history = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)["history"]
    assert history["test_epoch"] == [1, 3] and len(history["test_acc"]) == 2


def test_fresh_run_never_replaces_a_saved_one(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "vit.pt").write_bytes(b"forty epochs of work")
    load_data = vit.load_data
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match="holds a run: go on with --resume, or use another"):
        run(tmp_path)
    assert (tmp_path / "out" / "vit.pt").read_bytes() == b"forty epochs of work"

    def another_run_starts_meanwhile(*args):
        (tmp_path / "second" / "out" / "vit.pt").write_bytes(b"the other run's")
        return load_data(*args)
    monkeypatch.setattr(vit, "load_data", another_run_starts_meanwhile)
    with pytest.raises(SystemExit, match="File exists"):
        run(tmp_path / "second")
    assert (tmp_path / "second" / "out" / "vit.pt").read_bytes() == b"the other run's"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train_step, calls = vit.train_step, []

    def nan_in_epoch_two(*args):
        calls.append(1)
        loss = train_step(*args)
        return loss * float("nan") if len(calls) > 8 else loss  # 8 steps an epoch
    monkeypatch.setattr(vit, "train_step", nan_in_epoch_two)
    message = "the training loss is nan in epoch 2, stopped: .*vit.pt keeps the run up to epoch 1"
    with pytest.raises(SystemExit, match=message) as exit:
        run(tmp_path, "--epochs", "3")
    assert exit.value.code != 0
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["train_loss"]) == 1


def test_full_disk_exits_1_keeping_the_last_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_after_two(*args):
        calls.append(1)
        if len(calls) > 2:  # epoch 0 and epoch 1 are written
            raise OSError(28, "No space left on device")
        return save(*args)
    monkeypatch.setattr(torch, "save", full_after_two)
    with pytest.raises(SystemExit, match="No space left on device"):
        run(tmp_path, "--epochs", "3")
    assert not list((tmp_path / "out").glob("*.tmp"))
    monkeypatch.setattr(torch, "save", save)
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["train_loss"]) == 1


def test_failed_first_save_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    save = torch.save

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left on device"):
        run(tmp_path, "--epochs", "1")
    assert not list((tmp_path / "out").iterdir())  # no vit.pt, not even an empty one, no .tmp
    monkeypatch.setattr(torch, "save", save)
    assert len(run(tmp_path, "--epochs", "1")["history"]["train_loss"]) == 1  # the folder is free


def test_ctrl_c_while_decoding_exits_130_saying_nothing_was_saved(tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(vit, "load_data", interrupt)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path)
    assert exit.value.code == 130
    assert "interrupted: no checkpoint written" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_resume_from_a_broken_checkpoint_exits_1_with_a_message(tmp_path, monkeypatch, content):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "vit.pt").write_bytes(content)
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match="--resume found no vit.py checkpoint at .*vit.pt"):
        vit.main(["--out-dir", str(tmp_path / "out"), "--resume"])


def test_resume_from_a_foreign_checkpoint_or_none_exits_1(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match=r"no vit.py checkpoint at .* \(FileNotFoundError\)"):
        vit.main(["--out-dir", str(tmp_path / "out"), "--resume"])
    torch.save({"model": {}}, tmp_path / "out" / "vit.pt")
    with pytest.raises(SystemExit, match=r"no vit.py checkpoint at .* \(it has other keys\)"):
        vit.main(["--out-dir", str(tmp_path / "out"), "--resume"])


@pytest.mark.parametrize("where", ["file", "file/under"])
def test_unusable_out_dir_exits_1_before_decoding(tmp_path, monkeypatch, where):
    (tmp_path / "file").write_text("a file, not a folder")
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match="cannot write to --out-dir"):
        vit.main([*TINY, "--out-dir", str(tmp_path / where)])
    assert not list(tmp_path.glob("*.tmp"))


def test_pretrained_path_with_random_torchvision_weights(tmp_path, monkeypatch):
    small = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                              hidden_dim=32, mlp_dim=64)
    monkeypatch.setattr(torchvision.models, "vit_b_16", lambda weights: small)
    train, start = vit.train, {}

    def spy(model, *args, **kwargs):
        start.update({k: v.clone() for k, v in model.state_dict().items()})
        start["lr"] = args[4]
        return train(model, *args, **kwargs)
    monkeypatch.setattr(vit, "train", spy)
    vit.main(["--fake-data", "--workers", "0", "--batch-size", "32", "--epochs", "1",
              "--pretrained", "--out-dir", str(tmp_path / "out")])
    checkpoint = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert checkpoint["config"] == dict(image_size=32, patch_size=16, num_classes=37, dim=32,
                                        depth=1, heads=2, mlp_dim=64, channels=3)
    # the options record the sizes of the model that was trained
    assert checkpoint["options"]["image_size"] == 32 and checkpoint["options"]["dim"] == 32
    weight = small.encoder.layers[0].self_attention.in_proj_weight
    assert torch.equal(start["blocks.0.attn.qkv.weight"], weight)
    assert start["head.weight"].shape == (37, 32) and not start["head.weight"].any()
    assert start["lr"] == 3e-5  # fine-tuning takes smaller steps


def test_pretrained_without_network_exits_1_with_a_clear_message(tmp_path, offline):
    with pytest.raises(SystemExit, match="could not download torchvision's ViT-B/16.*--pretrained"):
        vit.main(["--pretrained", "--fake-data", "--out-dir", str(tmp_path / "out")])


def test_missing_pet_without_network_exits_1_with_a_clear_message(tmp_path, offline):
    with pytest.raises(SystemExit) as exit:
        vit.main(["--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "out"),
                  "--workers", "0"])
    assert f"could not load Oxford-IIIT Pet from {tmp_path / 'nothing'}" in exit.value.code
    assert "--data-dir" in exit.value.code and "--fake-data" in exit.value.code
    assert not (tmp_path / "out" / "vit.pt").exists()  # the folder stays free for the next try


@pytest.mark.parametrize("damage", ["image", "annotation"])
def test_broken_pet_exits_1_with_a_message(tmp_path, damage):
    write_pet(tmp_path / "data")
    pet = tmp_path / "data" / "oxford-iiit-pet"
    if damage == "image":
        (pet / "images" / "Abyssinian_2.jpg").write_bytes(b"not a picture")
    else:
        (pet / "annotations" / "trainval.txt").write_text("Abyssinian_1 one 1 1\n")
    with pytest.raises(SystemExit) as exit:
        vit.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                  "--workers", "1"])
    assert exit.value.code.startswith("error: could not load Oxford-IIIT Pet")
    assert "Traceback" not in exit.value.code and "\n" not in exit.value.code
    if damage == "image":
        assert "Abyssinian_2.jpg" in exit.value.code


def test_missing_dataset_from_the_shell_exits_1_without_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, str(Path(vit.__file__)), "--data-dir", str(tmp_path),
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1 and "could not load Oxford-IIIT Pet" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs and --batch-size must be >= 1"),
    (["--epochs", "ten"], "--epochs: invalid int value: 'ten'"),
    (["--patch-size", "7"], "patch_size 7 does not divide image_size 96"),
    (["--heads", "3"], "heads 3 does not divide dim 128"),
    (["--pretrained", "--dim", "64"], "--pretrained takes ViT-B/16's sizes"),
    (["--depth", "0"], "depth must be a positive integer, got 0"),
    (["--lr", "-1"], "--lr must be in (0, 1), got -1.0"),
    (["--seed", "-1"], "--seed must be from 0 to 2**32 - 1, got -1"),
    (["--seed", str(2**64)], "--seed must be from 0 to 2**32 - 1"),
    (["--workers", "-2"], "--workers must be 0 or more, got -2"),
    (["--device", "tpu"], "no --device tpu here"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
])
def test_bad_arguments_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        vit.main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err
