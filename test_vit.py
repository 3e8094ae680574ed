"""Tests for vit.py: CPU only, about a minute. Run: python -m pytest test_vit.py"""
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer

import vit

PETS3 = Path(__file__).resolve().parent.parent / "shared" / "data" / "pets3"
TINY = ["--image-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64",
        "--batch-size", "32", "--workers", "0", "--fake-data"]
DETERMINISTIC = ("train_loss", "test_loss", "test_acc", "lr")  # the history without its timings


def tiny_vit(**changes):
    config = dict(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64) | changes
    return vit.ViT(**config)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, as in CI, also on a machine that has one; and no cached torch weights."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


# ---------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("image_size, patch_size, channels, heads, depth", [(32, 8, 3, 2, 2), (28, 7, 1, 4, 1),
                                                                            (48, 16, 3, 1, 3), (16, 16, 1, 2, 1)])
def test_output_shape(image_size, patch_size, channels, heads, depth):
    model = tiny_vit(image_size=image_size, patch_size=patch_size, channels=channels, heads=heads, depth=depth)
    assert model(torch.randn(3, channels, image_size, image_size)).shape == (3, 5)
    logits, weights = model(torch.randn(2, channels, image_size, image_size), return_weights=True)
    n = (image_size // patch_size) ** 2 + 1
    assert logits.shape == (2, 5) and [w.shape for w in weights] == [(2, heads, n, n)] * depth


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
    torch.manual_seed(0)
    tv = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128,
                           num_classes=7).eval()
    with torch.no_grad():  # its head and positional embedding start at zero, biases too: randomise everything
        for p in tv.parameters():
            p.normal_(0, 0.2)
    model = vit.from_torchvision(tv).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x), tv(x)
    assert (ours - theirs).norm() / theirs.norm() < 1e-5
    assert model.config == dict(image_size=32, patch_size=8, num_classes=7, dim=64, depth=3, heads=4, mlp_dim=128,
                                channels=3)
    fresh = vit.from_torchvision(tv, num_classes=37)
    assert fresh.head.out_features == 37 and fresh.head.weight.abs().sum() == 0 and fresh.config["num_classes"] == 37


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


@pytest.mark.parametrize("make, message", [
    (lambda: tiny_vit(image_size=30), "image_size 30 is not a multiple of patch_size 8"),
    (lambda: tiny_vit(dim=30, heads=4), "dim 30 is not a multiple of heads 4"),
    (lambda: tiny_vit()(torch.randn(3, 32, 32)), r"expected images of shape \(batch, 3, 32, 32\), got \(3, 32, 32\)"),
    (lambda: tiny_vit()(torch.randn(2, 1, 32, 32)), r"shape \(batch, 3, 32, 32\), got \(2, 1, 32, 32\)"),
    (lambda: tiny_vit()(torch.randn(2, 3, 64, 64)), r"shape \(batch, 3, 32, 32\), got \(2, 3, 64, 64\)"),
])
def test_bad_config_and_bad_input_raise_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_attention_rollout_maps_sum_to_one_over_the_patches():
    model = tiny_vit()
    maps = vit.attention_rollout(model, torch.randn(3, 3, 32, 32))
    assert maps.shape == (3, 4, 4) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(3))


# ----------------------------------------------------------------------------------------- data


def write_pet(root):
    """A small Pet in torchvision's layout, its quirks included: a grayscale JPEG, and an RGBA and a palette
    image that are PNGs named .jpg. Returns the trainval and test image names."""
    images, annotations = root / "oxford-iiit-pet" / "images", root / "oxford-iiit-pet" / "annotations"
    images.mkdir(parents=True), annotations.mkdir()
    generator = torch.Generator().manual_seed(0)
    splits = {"trainval": [], "test": []}
    for i, (name, class_id, mode) in enumerate([("Abyssinian_1", 1, "RGB"), ("Abyssinian_2", 1, "L"),
                                                ("Bengal_1", 6, "RGBA"), ("american_bulldog_1", 2, "RGB"),
                                                ("Bengal_2", 6, "P"), ("american_bulldog_2", 2, "RGB")]):
        pixels = torch.randint(0, 256, (40 + 9 * i, 50, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).convert(mode).save(images / f"{name}.jpg", "JPEG" if mode in "RGBL" else "PNG")
        splits["test" if i >= 4 else "trainval"].append(name)
        with open(annotations / f"{'test' if i >= 4 else 'trainval'}.txt", "a") as f:
            f.write(f"{name} {class_id} {2 if 'bulldog' in name else 1} 1\n")
    return splits


def test_pet_is_decoded_to_rgb_tensors_and_cached(tmp_path):
    names = write_pet(tmp_path)["trainval"]
    images, labels = vit.load_data(tmp_path, "trainval", 32, workers=0)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert labels.tolist() == [0, 0, 5, 1]  # Pet's class ids less one: the head needs all 37 outputs
    for image, name in zip(images, names):  # exactly the decoded, resized and centre-cropped images
        pil = Image.open(tmp_path / "oxford-iiit-pet" / "images" / f"{name}.jpg").convert("RGB")
        assert torch.equal(image, TF.pil_to_tensor(TF.center_crop(TF.resize(pil, 32), 32)))
    assert torch.equal(images[1][0], images[1][2])  # the grayscale image, as RGB
    for jpeg in (tmp_path / "oxford-iiit-pet" / "images").iterdir():
        jpeg.unlink()  # a second load reads the cache, not the JPEGs
    cached_images, cached_labels = vit.load_data(tmp_path, "trainval", 32, workers=0)
    assert torch.equal(cached_images, images) and torch.equal(cached_labels, labels)


@pytest.mark.skipif(not PETS3.exists(), reason="../shared/data/pets3 is not beside this checkout")
def test_real_pet_slice_loads(tmp_path):
    (tmp_path / "oxford-iiit-pet").symlink_to(PETS3 / "oxford-iiit-pet")  # keeps the cache out of shared/
    images, labels = vit.load_data(tmp_path, "test", 48, workers=2)
    assert images.shape == (298, 3, 48, 48) and sorted(set(labels.tolist())) == [0, 1, 5]
    assert 60 < images.float().mean() < 190 and images.float().std() > 30  # real pictures, not blank


def test_augmentation_keeps_shape_dtype_and_labels():
    torch.manual_seed(0)
    images = (torch.arange(10, dtype=torch.uint8) * 25).view(10, 1, 1, 1).expand(10, 3, 16, 16)  # image i: grey 25 i
    labels = torch.arange(10) + 20
    mean, std = torch.tensor(vit.MEAN).view(3, 1, 1), torch.tensor(vit.STD).view(3, 1, 1)
    (x, y), = vit.Batches(images, labels, 10, "cpu", train=True)
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.tolist()) == labels.tolist()  # shuffled, every image once
    grey = ((y - 20) * 25.0).view(10, 1, 1, 1).expand(10, 3, 16, 16)
    torch.testing.assert_close((x * std + mean) * 255, grey, atol=1e-3, rtol=0)  # each label kept its own image
    (x, y), = vit.Batches(images, labels, 10, "cpu")  # evaluation: in order, not augmented
    torch.testing.assert_close((x * std + mean) * 255, images.float(), atol=1e-3, rtol=0)
    assert torch.equal(y, labels)
    ramp = torch.linspace(-1, 1, 16).expand(8, 3, 16, 16)
    crops = vit.augment(ramp)
    assert crops.shape == ramp.shape and crops.min() >= -1 and crops.max() <= 1
    changed = [not torch.allclose(crop, ramp[0], atol=1e-2) for crop in crops]
    assert sum(changed) >= 6  # nearly every image is cropped or mirrored (a crop can cover the whole width)


def test_mix_blends_images_and_targets_in_the_same_proportion():
    values = torch.arange(8.0)  # image i is flat grey i and has label i
    images = values.view(8, 1, 1, 1).expand(8, 3, 12, 12)
    kinds = set()
    for seed in range(20):  # both branches, mixup and cutmix, come up
        torch.manual_seed(seed)
        x, target = vit.mix(images, torch.arange(8), num_classes=10)
        assert x.shape == images.shape and target.shape == (8, 10) and target[:, 8:].eq(0).all()
        torch.testing.assert_close(target.sum(-1), torch.ones(8))
        torch.testing.assert_close(x.mean((1, 2, 3)), target[:, :8] @ values)  # pixel shares = target shares
        kinds.add("cutmix" if torch.isin(x, values).all() else "mixup")  # cutmix moves pixels, never blends them
    assert kinds == {"mixup", "cutmix"}
    assert torch.equal(images, values.view(8, 1, 1, 1).expand(8, 3, 12, 12))  # the input is left alone


# ---------------------------------------------------------------------------------- command line


def run(tmp_path, *args):
    vit.main([*TINY, "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), *args])
    return torch.load(tmp_path / "out" / "vit.pt", weights_only=True)


def test_cli_writes_plots_and_a_checkpoint_that_loads_back(tmp_path):
    state = run(tmp_path, "--epochs", "2")
    for name in ("patches.png", "loss.png", "attention.png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 300
    assert not list((tmp_path / "out").glob("*.tmp"))
    model = vit.ViT(**state["config"])
    model.load_state_dict(state["model"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 37)
    assert len(state["history"]["test_acc"]) == 2 and all(0 <= a <= 1 for a in state["history"]["test_acc"])


def test_same_seed_same_history(tmp_path):
    first = run(tmp_path / "a", "--epochs", "2", "--seed", "3")["history"]
    second = run(tmp_path / "b", "--epochs", "2", "--seed", "3")["history"]
    other = run(tmp_path / "c", "--epochs", "2", "--seed", "4")["history"]
    assert all(first[k] == second[k] for k in DETERMINISTIC) and first["train_loss"] != other["train_loss"]


def test_interrupted_run_saves_and_resumes_to_the_same_history(tmp_path, monkeypatch):
    uninterrupted = run(tmp_path / "whole", "--epochs", "3")["history"]
    evaluate, calls = vit.evaluate, []

    def interrupt_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args)
    monkeypatch.setattr(vit, "evaluate", interrupt_in_epoch_two)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "cut", "--epochs", "3")
    assert exit.value.code == 130
    saved = torch.load(tmp_path / "cut" / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["test_acc"]) == 1 and (tmp_path / "cut" / "out" / "loss.png").exists()
    monkeypatch.setattr(vit, "evaluate", evaluate)
    resumed = run(tmp_path / "cut", "--epochs", "3", "--resume")["history"]
    assert all(resumed[k] == uninterrupted[k] for k in DETERMINISTIC)


def test_pretrained_path_with_random_torchvision_weights(tmp_path, monkeypatch):
    import torchvision
    small = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    monkeypatch.setattr(torchvision.models, "vit_b_16", lambda weights: small)
    train, start = vit.train, {}

    def spy(model, *args, **kwargs):
        start.update({k: v.clone() for k, v in model.state_dict().items()})
        return train(model, *args, **kwargs)
    monkeypatch.setattr(vit, "train", spy)
    state = run(tmp_path, "--epochs", "1", "--pretrained", "--image-size", "64")  # the image size is ViT-B's own
    assert state["config"] == dict(image_size=32, patch_size=16, num_classes=37, dim=32, depth=1, heads=2,
                                   mlp_dim=64, channels=3)
    assert torch.equal(start["blocks.0.attn.qkv.weight"], small.encoder.layers[0].self_attention.in_proj_weight)
    assert start["head.weight"].shape == (37, 32) and not start["head.weight"].any()


def test_pretrained_without_network_exits_1_with_a_clear_message(tmp_path, offline):
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--pretrained")
    assert "could not download torchvision's ViT-B/16" in exit.value.code and "without --pretrained" in exit.value.code


def test_missing_pet_without_network_exits_1_with_a_clear_message(tmp_path, offline):
    with pytest.raises(SystemExit) as exit:
        vit.main(["--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "out"), "--workers", "0"])
    assert f"could not load Oxford-IIIT Pet from {tmp_path / 'nothing'}" in exit.value.code
    assert "--data-dir" in exit.value.code and "--fake-data" in exit.value.code


def test_broken_image_exits_1_naming_the_file(tmp_path):
    write_pet(tmp_path / "data")
    (tmp_path / "data" / "oxford-iiit-pet" / "images" / "Abyssinian_2.jpg").write_bytes(b"not a picture")
    with pytest.raises(SystemExit) as exit:
        vit.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--workers", "1"])
    assert "Abyssinian_2.jpg" in exit.value.code and "Traceback" not in exit.value.code


def test_missing_dataset_from_the_shell_exits_1_without_traceback(tmp_path):
    import subprocess
    import sys
    env = {"PATH": "/usr/bin:/bin", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, str(Path(vit.__file__)), "--data-dir", str(tmp_path), "--out-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "could not load Oxford-IIIT Pet" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [(["--epochs", "0"], "--epochs: must be a whole number of at least 1"),
                                           (["--patch-size", "7"], "--patch-size 7 does not divide --image-size 96"),
                                           (["--heads", "3"], "--heads 3 does not divide --dim 128"),
                                           (["--lr", "-1"], "--lr must be in (0, 1), got -1.0")])
def test_bad_arguments_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        vit.main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err
