"""Tests for vit.py: CPU only, under a minute. Run: python -m pytest test_vit.py"""
import copy
import os
import re
import runpy
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import matplotlib.pyplot as plt
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer

import vit

HERE = Path(__file__).resolve().parent
PETS3 = HERE.parent / "shared" / "data" / "pets3"
TINY = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64)
STEPS_PER_EPOCH = 4  # write_photos' 32 training images in batches of 8


@pytest.fixture
def offline(monkeypatch):
    """No network, as in CI, also on a machine that has one."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def tiny(monkeypatch):
    """The command line's model, made small, so that a run takes a second."""
    monkeypatch.setattr(vit, "MODEL", TINY)


def tiny_vit(**changes):
    return vit.ViT(**(TINY | dict(num_classes=5) | changes))


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


def write_photos(root, classes=("cat", "dog"), train=16, test=4, test_name="test"):
    """Your own images: root/train/<class>/ and root/test/<class>/, a colour for each class, in
    several file types and modes, some in a subfolder, with the files that photo folders hold
    beside images: hidden ones, notes, thumbnails."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), (test_name, test)):
        for label, name in enumerate(classes):
            (root / split / name / "2023").mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 60, (30 + i, 40, 3), generator=generator)
                pixels = (noise + 150 * label).to(torch.uint8).numpy()
                mode, suffix = [("RGB", "png"), ("L", "jpg"), ("RGBA", "PNG")][i % 3]
                folder = root / split / name / ("2023" if i % 4 == 3 else "")
                Image.fromarray(pixels).convert(mode).save(folder / f"{i}.{suffix}")
            (root / split / name / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "cat" / "._0.png").write_bytes(b"\0\5\26\7")  # hidden, with an image's name
    (root / "train" / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")  # not images
    (root / "train" / "dog" / "notes.txt").write_text("good dogs")
    shutil.copytree(root / "train" / "cat", root / "train" / ".ipynb_checkpoints")  # no class
    shutil.copytree(root / "train" / "cat" / "2023", root / "train" / "dog" / ".thumbnails")
    return root


def fake_data(count=8, classes=5, size=32):
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    return images, torch.arange(count) % classes


# ---------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("image_size, patch_size, channels, heads, depth",
                         [(32, 8, 3, 2, 2), (28, 7, 1, 4, 1), (48, 16, 3, 1, 3), (16, 16, 1, 2, 1)])
def test_output_shape(image_size, patch_size, channels, heads, depth):
    model = tiny_vit(image_size=image_size, patch_size=patch_size, channels=channels, heads=heads,
                     depth=depth)
    assert model(torch.randn(3, channels, image_size, image_size)).shape == (3, 5)
    for block in model.blocks:
        block.attn.keep_weights = True
    assert model(torch.randn(2, channels, image_size, image_size)).shape == (2, 5)
    n = (image_size // patch_size) ** 2 + 1
    assert [block.attn.weights.shape for block in model.blocks] == [(2, heads, n, n)] * depth


def test_patch_embedding_is_a_strided_convolution():
    embed = vit.PatchEmbedding(image_size=32, patch_size=8, channels=3, dim=24)
    conv = nn.Conv2d(3, 24, kernel_size=8, stride=8)
    conv.weight.data = embed.proj.weight.data.view(24, 3, 8, 8)  # (c, p1, p2) order
    conv.bias.data = embed.proj.bias.data
    x = torch.randn(4, 3, 32, 32)
    expected = conv(x).flatten(2).transpose(1, 2)  # (b, n, dim), patches row by row
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_gives_the_same_tokens_with_and_without_kept_weights():
    attention = vit.Attention(dim=48, heads=4).eval()
    x = torch.randn(3, 17, 48)
    fused = attention(x)
    assert fused.shape == (3, 17, 48) and not hasattr(attention, "weights")
    attention.keep_weights = True
    explicit = attention(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    weights = attention.weights  # (b, heads, n, n), each row a distribution over the tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 17))
    q, k, v = attention.qkv(x).view(3, 17, 3, 4, 12).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(weights, (q @ k.transpose(-2, -1) / 12**0.5).softmax(-1))
    attention.keep_weights = False
    attention(torch.randn(3, 17, 48))  # the fused kernel keeps nothing
    assert attention.weights is weights


# our parameter names -> torchvision's (its MLP keeps a Dropout at index 2)
RENAMES = [("patch_embed.proj.", "conv_proj."), ("cls_token", "class_token"),
           ("pos_embedding", "encoder.pos_embedding"), ("blocks.", "encoder.layers.encoder_layer_"),
           ("norm1.", "ln_1."), ("norm2.", "ln_2."), ("mlp.2.", "mlp.3."), ("norm.", "encoder.ln."),
           ("attn.qkv.", "self_attention.in_proj_"), ("attn.proj.", "self_attention.out_proj."),
           ("head.", "heads.head.")]


def from_torchvision(tv):
    """Our ViT with a torchvision VisionTransformer's sizes and weights."""
    model = vit.ViT(tv.image_size, tv.patch_size, tv.num_classes, tv.hidden_dim,
                    len(tv.encoder.layers), tv.encoder.layers[0].num_heads, tv.mlp_dim)
    theirs = tv.state_dict()
    ours = model.state_dict()
    assert len(ours) == len(theirs)  # every tensor has its counterpart
    for name, param in ours.items():
        their_name = name
        for our_part, their_part in RENAMES:
            their_name = their_name.replace(our_part, their_part)
        weight = theirs[their_name]
        if name == "patch_embed.proj.weight":  # the conv's (dim, c, p, p) is our (dim, c * p * p)
            weight = weight.flatten(1)
        param.copy_(weight)
    return model


@pytest.mark.parametrize("image_size, patch_size", [(32, 8), (28, 14)])
def test_with_torchvisions_weights_it_gives_torchvisions_logits(image_size, patch_size):
    tv = random_torchvision_vit(image_size=image_size, patch_size=patch_size)
    model = from_torchvision(tv).eval()
    x = torch.randn(5, 3, image_size, image_size)
    with torch.no_grad():
        ours, theirs = model(x), tv(x)
    assert (ours - theirs).norm() / theirs.norm() < 1e-5


def test_positions_start_as_sines_and_cosines_of_each_patchs_column_and_row():
    table = vit.sincos_2d(side=4, dim=8)  # 16 patches, 2 frequencies: 1 and 1 / 10000
    column, row = 2, 3
    x, y = torch.tensor([column, column / 10000]), torch.tensor([row, row / 10000])
    expected = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()])
    torch.testing.assert_close(table[row * 4 + column], expected)
    similarity = table @ table.T  # neighbours are more alike than patches far apart
    assert similarity[5, 6] > similarity[5, 7] > similarity[5, 15]
    assert vit.sincos_2d(3, 10).shape == (9, 10) and not vit.sincos_2d(3, 10)[:, 8:].any()
    model = tiny_vit()  # 4 x 4 patches of width 32, and a class token at position 0
    assert model.pos_embedding.shape == (1, 17, 32) and model.pos_embedding.requires_grad
    torch.testing.assert_close(model.pos_embedding[0, 1:], vit.sincos_2d(4, 32))
    assert not model.pos_embedding[0, 0].any()


def test_linear_layers_start_as_timms_truncated_normal_with_zero_biases():
    torch.manual_seed(0)
    model = tiny_vit(dim=64, mlp_dim=256, depth=4)
    mlp_weights = torch.cat([block.mlp[0].weight.flatten() for block in model.blocks])
    assert 0.019 < mlp_weights.std() < 0.021 and mlp_weights.mean().abs() < 0.001
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 + 4 * 4 and not any(m.bias.any() for m in linears)
    assert not model.cls_token.any()


def test_attention_starts_mimetic_so_that_tokens_attend_to_themselves():
    torch.manual_seed(0)
    attention = tiny_vit(dim=64, heads=4).blocks[1].attn
    q, k, v = attention.qkv.weight.split(64)  # (out, in) each
    eye = torch.eye(64)
    assert (q.T @ k - 0.7 * eye).abs().max() < 0.1  # scores x W_q^T W_k x^T near 0.7 |x|^2
    assert (attention.proj.weight @ v + 0.4 * eye).abs().max() < 0.1
    tokens = F.layer_norm(torch.randn(8, 17, 64), (64,))
    attention.keep_weights = True
    attention(tokens)  # weights (8, heads, 17, 17)
    assert attention.weights.diagonal(dim1=-2, dim2=-1).mean() > 0.3  # far above 1 / 17
    plain = nn.Linear(64, 192)
    nn.init.trunc_normal_(plain.weight, std=0.02)  # as every other linear layer starts
    attention.qkv.weight.data = plain.weight.data
    attention(tokens)
    assert attention.weights.diagonal(dim1=-2, dim2=-1).mean() < 0.07


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
    (dict(image_size=30), "patch_size 8 must be a positive divisor of 30"),
    (dict(dim=30, heads=4), "heads 4 must be a positive divisor of dim 30"),
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
    with pytest.raises(ValueError, match="patch_size 0 must be a positive divisor of 32"):
        vit.PatchEmbedding(32, 0, 3, 8)
    with pytest.raises(ValueError, match="heads 0 must be a positive divisor of dim 32"):
        vit.Attention(32, 0)


def test_the_model_constructor_checks_survive_python_dash_o():
    source = (HERE / "vit.py").read_text()
    stripped = {}  # vit.py as python -O runs it: without its asserts, were there any
    exec(compile(source, "vit.py", "exec", optimize=1), stripped)
    with pytest.raises(ValueError, match="heads 4 must be a positive divisor of dim 30"):
        stripped["Attention"](30, 4)
    with pytest.raises(ValueError, match="depth must be a positive integer, got 0"):
        stripped["ViT"](32, 8, 5, 32, 0, 2, 64)


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


def test_pet_is_decoded_to_rgb_tensors(tmp_path):
    names = write_pet(tmp_path)["trainval"]
    (files, labels), test, classes = vit.open_data(tmp_path)
    images = vit.load_images(files, 32)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert labels.tolist() == [0, 0, 5, 1]  # Pet's class ids less one: the head needs all 37
    assert len(classes) == 37 and classes[:3] == ["Abyssinian", "American Bulldog", "class 2"]
    assert classes[5] == "Bengal" and classes[36] == "class 36"
    for image, name in zip(images, names):  # exactly the decoded, resized, centre-cropped images
        pil = Image.open(tmp_path / "oxford-iiit-pet" / "images" / f"{name}.jpg").convert("RGB")
        assert torch.equal(image, TF.pil_to_tensor(TF.center_crop(TF.resize(pil, 32), 32)))
    assert torch.equal(images[1][0], images[1][2])  # the grayscale image, as RGB
    assert not list(tmp_path.glob("*.pt"))  # decoded into memory only: no cache to go stale


@pytest.mark.skipif(not PETS3.exists(), reason="../shared/data/pets3 is not beside this checkout")
def test_real_pet_slice_loads(tmp_path):
    (tmp_path / "oxford-iiit-pet").symlink_to(PETS3 / "oxford-iiit-pet")
    train, (files, labels), classes = vit.open_data(tmp_path)
    images = vit.load_images(files, 48)
    assert images.shape == (298, 3, 48, 48) and sorted(set(labels.tolist())) == [0, 1, 5]
    assert [classes[label] for label in (0, 1, 5)] == ["Abyssinian", "American Bulldog", "Bengal"]
    assert 60 < images.float().mean() < 190 and images.float().std() > 30  # real pictures
    assert len(train[0]) == 300


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_own_photos_count_subfolders_and_skip_hidden_files_and_files_that_are_not_images(
        tmp_path, test_name):
    photos = write_photos(tmp_path / "photos", test_name=test_name)
    (train_files, train_labels), (test_files, test_labels), classes = vit.open_data(photos)
    assert classes == ["cat", "dog"]  # not .ipynb_checkpoints
    visible = [file for file in photos.glob("train/*/**/[0-9]*.*")
               if not any(part[0] == "." for part in file.relative_to(photos).parts)]
    assert sorted(train_files) == sorted(visible)
    assert len(train_files) == 32 and train_labels.tolist() == [0] * 16 + [1] * 16
    assert all(file.relative_to(photos).parts[1] == classes[label]
               for file, label in zip(train_files, train_labels))
    assert sum(file.parent.name == "2023" for file in train_files) == 8  # in a class's subfolder
    assert len(test_files) == 8 and test_labels.tolist() == [0] * 4 + [1] * 4
    assert {file.relative_to(photos).parts[0] for file in test_files} == {test_name}


def test_images_are_read_upright_as_a_person_sees_them(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)  # red on the left, blue on the right
    wide[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the picture turned a quarter clockwise
    Image.fromarray(wide).save(tmp_path / "phone.jpg", exif=exif)
    upright = np.asarray(vit.read_image(tmp_path / "phone.jpg"))
    assert upright.shape == (40, 20, 3)  # tall, as taken
    assert upright[5, 10, 0] > 200 and upright[35, 10, 2] > 200  # red above, blue below
    palette = Image.fromarray(wide).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.png")
    assert (np.asarray(vit.read_image(tmp_path / "palette.png")) == wide).all()


def test_normalise_uses_imagenets_mean_and_std():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1).expand(2, 3, 4, 4)
    expected = torch.tensor([(0 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    torch.testing.assert_close(vit.normalise(images), expected.view(3, 1, 1).expand(2, 3, 4, 4))


# ------------------------------------------------------------------------------------- training

class Recorder(nn.Module):
    """A model that keeps the images it is trained on and guesses from their brightness."""
    def __init__(self, classes=2):
        super().__init__()
        self.config = dict(num_classes=classes)
        self.scale = nn.Parameter(torch.ones(classes, 1))
        self.seen = []

    def forward(self, images):
        if self.training:
            self.seen.append(images)
        return (images.mean((1, 2, 3)) * self.scale).T  # (b, classes)


def horizontal_ramp(count=64, size=32):  # uint8, rising from 0 to 255 left to right
    return torch.linspace(0, 255, size).round().to(torch.uint8).expand(count, 3, size, size)


def train_on_ramps(**recipe):
    torch.manual_seed(0)
    model = Recorder()
    ramps = (horizontal_ramp(), torch.zeros(64, dtype=torch.long))
    vit.train(model, ramps, ramps, epochs=1, mix=False, **recipe)
    seen = torch.cat(model.seen)  # normalised: the ramp rises by 1 / 0.229 in the red channel
    return (seen[:, 0, 16, -1] - seen[:, 0, 16, 0]) * 0.229  # each crop's width, mirrored < 0


def test_augmentation_mirrors_only_with_flip():
    assert 16 < (train_on_ramps() < 0).sum() < 48  # about half the images are mirrored
    assert (train_on_ramps(flip=False) > 0).all()


def test_augmentation_crops_no_less_than_min_scale_of_the_image():
    for min_scale in (0.05, 0.5, 0.9):
        widths = train_on_ramps(min_scale=min_scale, flip=False)
        # the narrowest crop: the smallest area at the tallest aspect, 3 / 4 of its square's side
        assert widths.min() > (min_scale * 3 / 4) ** 0.5 - 0.05 and widths.max() < 1.01
    assert train_on_ramps(min_scale=0.05, flip=False).min() < 0.5
    assert train_on_ramps(flip=False).min() > (0.5 * 3 / 4) ** 0.5 - 0.05  # by default


def numbered_images(count=24):  # uint8 (count, 3, 8, 8): image i is i grey levels bright
    return torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 8, 8)


def test_each_epoch_visits_every_training_image_once_in_a_new_order():
    torch.manual_seed(0)
    model = Recorder()
    data = (numbered_images(), torch.zeros(24, dtype=torch.long))
    vit.train(model, data, data, epochs=3, batch_size=4, mix=False, min_scale=1.0, flip=False)
    seen = (torch.cat(model.seen)[:, 0, 0, 0] * 0.229 + 0.485) * 255  # the grey levels back
    orders = seen.round().long().view(3, 24).tolist()
    assert all(sorted(order) == list(range(24)) for order in orders)  # each image once an epoch
    assert orders[0] != list(range(24)) and orders[0] != orders[1] != orders[2]


def test_lr_warms_up_from_above_zero_to_the_peak_then_follows_a_cosine():
    lrs = [vit.lr_at(step, 1.0, warmup_steps=4, total_steps=20) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # the peak at the last warm-up step
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert 0 < lrs[-1] < 0.01
    assert vit.lr_at(0, 1.0, warmup_steps=0, total_steps=1) == 1.0  # a one-step run learns


def spy_on_adamw(monkeypatch):
    """Returns the list that each optimizer step adds its param groups and gradient norm to."""
    steps = []

    class AdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            grads = [p.grad.flatten() for group in self.param_groups for p in group["params"]]
            norm = torch.cat(grads).norm().item()
            steps.append(([(g["lr"], g["weight_decay"]) for g in self.param_groups], norm))
            return super().step(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    return steps


@pytest.mark.parametrize("epochs, warmup", [(20, 1), (10, 5)])  # at most a tenth of the run
def test_train_warms_up_over_an_epoch_then_follows_the_cosine(monkeypatch, epochs, warmup):
    steps = spy_on_adamw(monkeypatch)
    vit.train(tiny_vit(), fake_data(16), fake_data(16), epochs=epochs, batch_size=8, lr=0.01,
              warmup=warmup)
    lrs = [groups[0][0] for groups, norm in steps]
    assert all(groups[1][0] == groups[0][0] for groups, norm in steps)  # both groups alike
    assert len(lrs) == 2 * epochs  # 16 images in batches of 8
    assert lrs[:3] == [0.005, 0.01, 0.01]  # the warm-up's two steps, then the cosine from its peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.0001


def test_gradients_are_clipped_to_clip_norm_before_each_step(monkeypatch):
    steps = spy_on_adamw(monkeypatch)
    torch.manual_seed(0)
    vit.train(tiny_vit(), fake_data(16), fake_data(16), epochs=2, batch_size=8, clip_norm=1e-3)
    assert len(steps) == 4 and all(norm <= 1e-3 * (1 + 1e-4) for groups, norm in steps)
    assert vit.train.__kwdefaults__["clip_norm"] == 1.0


class Constant(nn.Module):
    """Logits that do not depend on the image (and barely move with a tiny lr)."""
    def __init__(self, logits):
        super().__init__()
        self.config = dict(num_classes=logits.shape[-1])
        self.logits = nn.Parameter(logits)

    def forward(self, images):
        return self.logits.expand(len(images), -1)


def test_the_training_loss_smooths_the_targets_by_a_tenth():
    logits = torch.tensor([[4.0, 0.0, -2.0]])
    images, labels = numbered_images(12), torch.tensor([0, 0, 1] * 4)
    history = vit.train(Constant(logits), (images, labels), (images, labels), epochs=1,
                        batch_size=4, lr=1e-9, mix=False)
    expected = F.cross_entropy(logits.expand(12, -1), labels, label_smoothing=0.1).item()
    unsmoothed = F.cross_entropy(logits.expand(12, -1), labels).item()
    assert history["train_loss"][0] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - unsmoothed) > 0.1  # so that the two cannot be taken for each other
    assert history["test_loss"][0] == pytest.approx(unsmoothed, rel=1e-5)  # tests are not smoothed


class GuessFromPixels(nn.Module):
    """Predicts class 0 for dark images and class 1 for bright ones."""
    def forward(self, images):
        brightness = images.mean((1, 2, 3))
        return torch.stack([-brightness, brightness], dim=1) * 10


def test_evaluate_scores_every_image_once_with_a_partial_last_batch():
    bright = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    images = torch.where(bright, 255, 0).to(torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4)
    labels = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 0, 0])  # images 3, 6 and 9 are guessed wrong
    loss, accuracy = vit.evaluate(GuessFromPixels(), images, labels, batch_size=4)
    assert accuracy == pytest.approx(0.7)
    logits = GuessFromPixels()(vit.normalise(images))
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item())


def test_a_run_of_one_step_changes_every_weight():
    torch.manual_seed(0)
    model = tiny_vit()
    before = [p.clone() for p in model.parameters()]
    history = vit.train(model, fake_data(), fake_data(), epochs=1, batch_size=8)
    assert len(history["train_loss"]) == len(history["test_acc"]) == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_only_weight_matrices_decay(monkeypatch):
    adamw, groups = torch.optim.AdamW, []

    def spy(param_groups, lr):
        groups.extend(param_groups)
        return adamw(param_groups, lr)
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    model = tiny_vit()
    vit.train(model, fake_data(), fake_data(), epochs=1, batch_size=8, weight_decay=0.3)
    names = {id(param): name for name, param in model.named_parameters()}
    decayed = {names[id(param)] for param in groups[0]["params"]}
    kept = {names[id(param)] for param in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.3 and groups[1]["weight_decay"] == 0
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= decayed
    assert {"cls_token", "pos_embedding", "head.bias", "norm.weight", "blocks.1.norm2.bias"} <= kept
    assert len(decayed) + len(kept) == len(names) and not decayed & kept
    assert vit.train.__kwdefaults__["weight_decay"] == 0.05


def spy_on_targets(monkeypatch):
    """Returns the list that each training step adds its targets to."""
    cross_entropy, targets = F.cross_entropy, []

    def keep_targets(logits, target, **kwargs):
        if "label_smoothing" in kwargs:  # a training step, not a test
            targets.append(target)
        return cross_entropy(logits, target, **kwargs)
    monkeypatch.setattr(F, "cross_entropy", keep_targets)
    return targets


@pytest.mark.parametrize("mix", [True, False])
def test_mix_turns_labels_into_mixed_class_probabilities(monkeypatch, mix):
    targets = spy_on_targets(monkeypatch)
    images, labels = fake_data(16)
    vit.train(tiny_vit(), (images, labels), (images, labels), epochs=3, batch_size=8, mix=mix)
    if mix:
        assert all(t.shape == (8, 5) and t.dtype == torch.float32 for t in targets)
        torch.testing.assert_close(torch.cat(targets).sum(-1), torch.ones(48))
        assert any((t.max(-1).values < 0.99).any() for t in targets)  # two classes in one target
    else:
        assert all(t.dtype == torch.int64 for t in targets)
        assert sorted(torch.cat(targets[:2]).tolist()) == sorted(labels.tolist())


def test_cutmix_share_chooses_between_cutmix_and_mixup():
    black_and_white = torch.tensor([0, 255] * 8, dtype=torch.uint8).view(16, 1, 1, 1)
    data = (black_and_white.expand(16, 3, 32, 32), torch.tensor([0, 1] * 8))
    black, white = -0.485 / 0.229, (1 - 0.485) / 0.229  # the two colours, normalised
    for cutmix_share in (0.0, 1.0):
        torch.manual_seed(0)
        model = Recorder()
        vit.train(model, data, data, epochs=3, batch_size=8, cutmix_share=cutmix_share)
        seen = torch.cat(model.seen)[:, 0]  # the red channel of each image trained on
        between = (seen - black).abs().gt(1e-4) & (seen - white).abs().gt(1e-4)
        one_colour = seen.amax((1, 2)) - seen.amin((1, 2)) < 1e-4
        if cutmix_share == 0:  # Mixup: every image blended evenly, some of them grey
            assert one_colour.all() and between.any()
        else:  # CutMix: a box of one image pasted into another, no grey
            assert not between.any() and not one_colour.all()


def test_each_epoch_is_tested_logged_and_handed_over(capsys, tmp_path):
    torch.manual_seed(0)
    handed = []
    history = vit.train(tiny_vit(), fake_data(), fake_data(), epochs=3, batch_size=8,
                        after_epoch=handed.append)
    assert len(history["train_loss"]) == len(history["test_loss"]) == len(history["test_acc"]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("train loss" in line and "test acc" in line for line in lines)
    assert [state.keys() for state in handed] == [{"model", "optimizer", "rng", "history"}] * 3
    assert handed[-1]["history"] == history
    vit.plot_history(history, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size[0] > 300


def test_train_resumes_from_a_handed_state_to_the_same_weights():
    torch.manual_seed(0)
    model, data, handed = tiny_vit(), fake_data(16), []
    vit.train(model, data, data, epochs=3, batch_size=8,
              after_epoch=lambda state: handed.append(copy.deepcopy(state)))
    first = handed[0]  # as saved after the first epoch
    assert len(first["history"]["test_acc"]) == 1
    resumed = tiny_vit()  # other weights, replaced by the state's
    history = vit.train(resumed, data, data, epochs=3, batch_size=8, resume_from=first)
    assert history == handed[-1]["history"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), model.parameters()))


# ---------------------------------------------------------------------------------- command line

def run(tmp_path, *args):
    """vit.py's command line on tmp_path/photos (written if missing); returns vit.pt."""
    if not (tmp_path / "photos").exists():
        write_photos(tmp_path / "photos")
    vit.main(["--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "photos"), *args])
    return torch.load(tmp_path / "out" / "vit.pt", weights_only=True)


def refuse_to_decode(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded images although the run should have stopped before")
    monkeypatch.setattr(vit, "load_images", fail)


def test_cli_writes_plots_and_a_checkpoint_that_scores_what_it_recorded(tmp_path, capsys, tiny):
    checkpoint = run(tmp_path, "--epochs", "2")
    assert checkpoint.keys() == {"model", "config", "options", "classes", "history", "optimizer",
                                 "rng"}
    assert checkpoint["classes"] == ["cat", "dog"] and checkpoint["config"]["num_classes"] == 2
    assert checkpoint["config"] == TINY | dict(num_classes=2, channels=3)
    for name in ("patches.png", "loss.png", "attention.png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 300
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "attention.png", "loss.png", "patches.png", "vit.pt"]  # no .tmp left
    assert checkpoint["options"]["batch_size"] == 8 and checkpoint["options"]["epochs"] == 2
    # absolute, so that --resume finds the data from any folder
    assert checkpoint["options"]["data_dir"] == str(tmp_path / "photos")
    model = vit.ViT(**checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    train, (files, labels), classes = vit.open_data(tmp_path / "photos")
    assert labels.tolist() == [0] * 4 + [1] * 4
    loss, accuracy = vit.evaluate(model, vit.load_images(files, 32), labels)
    assert accuracy == checkpoint["history"]["test_acc"][-1]
    assert loss == pytest.approx(checkpoint["history"]["test_loss"][-1])
    out = capsys.readouterr().out
    assert out.startswith("decoding 32 training and 8 test images\nepoch 1/2 ")
    assert out.endswith(f"test accuracy {accuracy:.1%}, plots and vit.pt in {tmp_path / 'out'}\n")


def test_the_default_run_trains_the_default_model_for_220_epochs(tmp_path, monkeypatch):
    trained, defaults = {}, vit.train.__kwdefaults__

    def spy(model, train_data, test_data, **recipe):
        trained.update(recipe, config=model.config, images=train_data[0].shape)
        raise KeyboardInterrupt
    monkeypatch.setattr(vit, "train", spy)
    write_photos(tmp_path / "photos")
    with pytest.raises(SystemExit):
        vit.main(["--data-dir", str(tmp_path / "photos"), "--out-dir", str(tmp_path / "out")])
    assert trained["config"] == vit.MODEL | dict(num_classes=2, channels=3)
    assert vit.MODEL == dict(image_size=96, patch_size=12, dim=128, depth=4, heads=4, mlp_dim=256)
    assert trained["images"] == (32, 3, 96, 96)
    assert (trained["epochs"], trained["batch_size"], trained["lr"]) == (220, 8, 3e-4)
    assert (defaults["epochs"], defaults["batch_size"], defaults["lr"]) == (220, 8, 3e-4)


def test_attention_plot_shows_the_class_tokens_attention_in_the_last_block(monkeypatch):
    figures = []

    def keep(figure, *args, **kwargs):  # instead of writing a file
        figures.append(figure)
    monkeypatch.setattr(plt.Figure, "savefig", keep)
    torch.manual_seed(0)
    model = tiny_vit(patch_size=16)  # 2 x 2 patches
    images, labels = fake_data(3)
    classes = ["Abyssinian", "Bengal", "Beagle", "Boxer", "Pug"]
    vit.plot_attention(model, images, labels, classes, "attention.png")
    assert not model.blocks[-1].attn.keep_weights  # later passes use the fused kernel again
    attention = model.blocks[-1].attn
    attention.keep_weights = True
    logits = model(vit.normalise(images))
    expected = attention.weights.mean(1)[:, 0, 1:].reshape(3, 1, 2, 2)  # heads averaged
    expected = F.interpolate(expected, size=(32, 32), mode="bilinear")
    for i, axis in enumerate(figures[0].axes):
        picture, heat_map = axis.get_images()
        assert (torch.tensor(picture.get_array()) == images[i].permute(1, 2, 0)).all()
        torch.testing.assert_close(torch.tensor(heat_map.get_array()), expected[i, 0])
        assert axis.get_title() == f"{classes[labels[i]]}\npredicted {classes[logits[i].argmax()]}"


def test_same_seed_same_history(tmp_path, tiny):
    first = run(tmp_path / "a", "--epochs", "2", "--seed", "3")["history"]
    second = run(tmp_path / "b", "--epochs", "2", "--seed", "3")["history"]
    other = run(tmp_path / "c", "--epochs", "2", "--seed", "4")["history"]
    assert first == second
    assert first["train_loss"] != other["train_loss"]


ORIGINAL_FORWARD = vit.ViT.forward


def interrupt_at_step(monkeypatch, step, error=KeyboardInterrupt):
    """Raises error in the given training step (counted from 1) of the next run."""
    forward, calls = vit.ViT.forward, []

    def interrupt(self, images):
        calls.append(self.training)
        if sum(calls) == step and self.training:
            raise error
        return forward(self, images)
    monkeypatch.setattr(vit.ViT, "forward", interrupt)


def test_interrupted_run_resumes_with_its_own_options_to_the_same_history(tmp_path, monkeypatch,
                                                                         capsys, tiny):
    uninterrupted = run(tmp_path / "whole", "--epochs", "3", "--lr", "0.001")["history"]
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 3)  # in epoch 2
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "cut", "--epochs", "3", "--lr", "0.001")
    assert exit.value.code == 130
    out = tmp_path / "cut" / "out"
    message = f"interrupted: {out}/vit.pt keeps the last whole epoch, --resume goes on"
    assert message in capsys.readouterr().err
    assert len(torch.load(out / "vit.pt", weights_only=True)["history"]["train_loss"]) == 1
    monkeypatch.setattr(vit.ViT, "forward", ORIGINAL_FORWARD)
    monkeypatch.chdir(tmp_path)  # the data folder is found from the checkpoint
    vit.main(["--out-dir", str(out), "--resume"])
    assert torch.load(out / "vit.pt", weights_only=True)["history"] == uninterrupted
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("epoch 2/3 ") and printed[2].startswith("epoch 3/3 ")
    assert len(printed) == 4


def test_a_run_stopped_while_drawing_gets_its_plots_from_resume(tmp_path, monkeypatch, capsys,
                                                                 tiny):
    plot_history = vit.plot_history

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(vit, "plot_history", interrupt)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--epochs", "2")
    assert exit.value.code == 130 and not (tmp_path / "out" / "loss.png").exists()
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    monkeypatch.setattr(vit, "plot_history", plot_history)
    capsys.readouterr()
    vit.main(["--out-dir", str(tmp_path / "out"), "--resume"])
    assert Image.open(tmp_path / "out" / "loss.png").size[0] > 300
    again = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert again["history"] == saved["history"]  # nothing trained twice
    accuracy = saved["history"]["test_acc"][-1]
    assert capsys.readouterr().out.endswith(f"test accuracy {accuracy:.1%}, plots and vit.pt in "
                                            f"{tmp_path / 'out'}\n")


def test_resume_takes_typed_options_a_moved_data_dir_and_this_machines_device(tmp_path,
                                                                              monkeypatch, tiny):
    checkpoint = run(tmp_path, "--epochs", "1", "--seed", "5")
    checkpoint["options"]["epochs"] = 2  # as if stopped after one of two epochs
    checkpoint["options"]["device"] = "meta"  # made on another machine
    checkpoint["options"]["out_dir"] = "elsewhere"  # where the folder was before it was moved
    torch.save(checkpoint, tmp_path / "out" / "vit.pt")
    (tmp_path / "photos").rename(tmp_path / "moved")
    folders, open_data = [], vit.open_data

    def spy(data_dir):
        folders.append(data_dir)
        return open_data(data_dir)
    monkeypatch.setattr(vit, "open_data", spy)
    moved = str(tmp_path / "moved")
    vit.main(["--out-dir", str(tmp_path / "out"), "--resume", "--data-dir", moved])
    assert folders == [moved]
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["train_loss"]) == 2 and saved["options"]["epochs"] == 2
    assert saved["options"]["device"] == "cpu" and saved["options"]["data_dir"] == moved
    assert saved["options"]["seed"] == 5 and saved["options"]["out_dir"] == str(tmp_path / "out")
    assert (tmp_path / "out" / "loss.png").exists() and not Path("elsewhere").exists()


def test_fresh_run_never_replaces_a_saved_one(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "vit.pt").write_bytes(b"forty epochs of work")
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match="holds a run: go on with --resume, or use another"):
        run(tmp_path)
    assert (tmp_path / "out" / "vit.pt").read_bytes() == b"forty epochs of work"


def test_a_second_run_started_while_the_first_trains_stops_and_the_first_keeps_its_run(
        tmp_path, monkeypatch, tiny):
    write_photos(tmp_path / "photos")
    forward, second = vit.ViT.forward, []

    def start_a_second_run(self, images):  # in the first run's first step, before any save
        if not second:
            with pytest.raises(SystemExit) as exit:
                vit.main(["--out-dir", str(tmp_path / "out"), "--data-dir",
                          str(tmp_path / "photos")])
            second.append(exit.value.code)
        return forward(self, images)
    monkeypatch.setattr(vit.ViT, "forward", start_a_second_run)
    first = run(tmp_path, "--epochs", "2")
    assert second == [f"error: {tmp_path}/out/vit.pt holds a run: go on with --resume, or use "
                      "another --out-dir"]
    assert len(first["history"]["test_acc"]) == 2


def test_two_runs_started_at_the_same_moment_never_share_vit_pt(tmp_path):
    write_photos(tmp_path / "photos")
    command = [sys.executable, str(HERE / "vit.py"), "--data-dir", str(tmp_path / "photos"),
               "--out-dir", str(tmp_path / "out"), "--epochs", "1"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen(command + ["--seed", str(seed)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=environment) for seed in (0, 1)]
    results = [(process.wait(timeout=120), *process.communicate()) for process in runs]
    codes = sorted(code for code, out, err in results)
    assert codes == [0, 1]  # one trained, the other stopped
    winner = [seed for seed, (code, out, err) in enumerate(results) if code == 0][0]
    loser_err = [err for code, out, err in results if code == 1][0]
    assert loser_err.startswith("error: ") and len(loser_err.strip().splitlines()) == 1
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert saved["options"]["seed"] == winner


def test_a_run_that_stops_before_its_first_epoch_leaves_the_folder_free(tmp_path, monkeypatch,
                                                                        capsys, tiny):
    interrupt_at_step(monkeypatch, 2)  # in the first epoch, before anything is saved
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--epochs", "2")
    assert exit.value.code == 130 and "interrupted: nothing saved" in capsys.readouterr().err
    assert not (tmp_path / "out" / "vit.pt").exists()
    (tmp_path / "photos" / "test" / "dog" / "1.jpg").write_text("not a picture")
    with pytest.raises(SystemExit, match="cannot read .*1.jpg as an image"):
        run(tmp_path, "--epochs", "2")  # a broken image, found while decoding
    assert not (tmp_path / "out" / "vit.pt").exists()


def test_ctrl_c_while_decoding_exits_130_saying_nothing_was_saved(tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(vit, "load_images", interrupt)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path)
    assert exit.value.code == 130
    assert "interrupted: nothing saved" in capsys.readouterr().err
    assert not (tmp_path / "out" / "vit.pt").exists()


def test_a_save_interrupted_midway_keeps_the_last_whole_epoch(tmp_path, monkeypatch, tiny):
    save, calls = torch.save, []

    def half_then_stop(checkpoint, path):  # the second save stops halfway through its file
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PK\x03\x04 the first bytes of a checkpoint")
            raise KeyboardInterrupt
        return save(checkpoint, path)
    monkeypatch.setattr(torch, "save", half_then_stop)
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "3")
    assert calls[0] == f"{tmp_path}/out/vit.pt.tmp"  # written aside, then renamed
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["test_acc"]) == 1


@pytest.mark.parametrize("mistake, error, message", [
    (lambda self, x: self.proj(x.transpose(1, 2)), RuntimeError, "mat1 and mat2 shapes cannot be"),
    (lambda self, x: dict(zip("qk", self.qkv(x).chunk(3, -1), strict=True)), ValueError,
     "zip\\(\\) argument 2 is longer than argument 1"),  # q, k, v unpacked as two
])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, mistake, error, message, tiny):
    monkeypatch.setattr(vit.Attention, "forward", mistake)  # a student's mistake in the shapes
    with pytest.raises(error, match=message):
        run(tmp_path, "--epochs", "1")
    assert not (tmp_path / "out" / "vit.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs and --batch-size must be whole numbers above 0, --lr above 0"),
    (["--batch-size", "-8"], "--epochs and --batch-size must be whole numbers above 0"),
    (["--batch-size", "8.5"], "argument --batch-size: invalid int value: '8.5'"),
    (["--lr", "0"], "--epochs and --batch-size must be whole numbers above 0, --lr above 0"),
    (["--lr", "nan"], "--epochs and --batch-size must be whole numbers above 0, --lr above 0"),
    (["--lr", "ten"], "argument --lr: invalid float value: 'ten'"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--dim", "64"], "unrecognized arguments: --dim 64"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--device", "cuda"], "argument --device: invalid choice: 'cuda'"),
])
def test_bad_options_are_one_line_errors_that_name_the_option(args, message, capsys):
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(SystemExit) as exit:
        vit.main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"error: {message}" in err and len(err.splitlines()) == 1


def test_help_describes_every_option_and_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        vit.main(["--help"])
    help = capsys.readouterr().out
    entries = re.split(r"\n  (?=--)", help.split("options:")[1])[1:]  # one for each option
    described = {entry.split()[0]: entry.split("(default")[0] for entry in entries}
    assert described.keys() == {"--data-dir", "--out-dir", "--epochs", "--batch-size", "--lr",
                                "--seed", "--device", "--resume"}
    for option, text in described.items():  # each with words that say what it is for
        assert len(re.findall(r"\b[a-z]{3,}\b", text)) >= 2, option
    help = " ".join(help.split())
    for default in (220, 8, 0.0003, "data", "out"):
        assert f"(default: {default})" in help
    assert "train/ and test/ (or val/) of class folders" in help


def test_missing_pet_without_network_says_what_to_do_in_one_line(tmp_path, offline, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default folder, data, is made for Pet
    with pytest.raises(SystemExit) as exit:
        vit.main([])
    assert exit.value.code == (
        f"error: Oxford-IIIT Pet could not be downloaded to {tmp_path / 'data'} (<urlopen error "
        "no network in this test>): go online, or use --data-dir with folders of your own images")
    assert not (tmp_path / "out" / "vit.pt").exists()  # the folder stays free for the next try
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"could not be downloaded to {empty} "):
        vit.main(["--data-dir", str(empty)])


@pytest.mark.parametrize("data_dir", ["photoz", "~/photos", "photos/cat.jpg"])
def test_a_data_dir_that_is_no_folder_is_named_and_left_uncreated(tmp_path, monkeypatch, offline,
                                                                   data_dir):
    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit:
        vit.main([f"--data-dir={data_dir}"])  # the shell does not expand ~ after =
    assert exit.value.code == f"error: {tmp_path / data_dir} is not a folder"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "photos"]
    assert not list((tmp_path / "out").iterdir())  # the claim on out/vit.pt is withdrawn


@pytest.mark.parametrize("layout", [["train/cat"], ["Train/cat", "Test/cat"], ["test/cat"],
                                    ["cat", "dog"], ["train/cat", "valid/cat"], ["notes"]])
def test_other_layouts_get_one_line_that_says_how_to_lay_images_out(tmp_path, offline, layout):
    for folder in layout:
        (tmp_path / "photos" / folder).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / "photos" / folder / "0.png")
    with pytest.raises(SystemExit) as exit:
        vit.main(["--data-dir", str(tmp_path / "photos"), "--out-dir", str(tmp_path / "out")])
    assert exit.value.code == (f"error: {tmp_path}/photos holds no train/ and test/ (or val/): "
                               "put each class's images in train/<class>/ and test/<class>/, or "
                               "empty it for Pet")
    assert not (tmp_path / "photos" / "oxford-iiit-pet").exists()  # not a place for Pet


@pytest.mark.parametrize("damage", ["image", "annotation"])
def test_broken_pet_exits_1_in_one_line(tmp_path, damage):
    write_pet(tmp_path / "data")
    pet = tmp_path / "data" / "oxford-iiit-pet"
    if damage == "image":
        (pet / "images" / "Abyssinian_2.jpg").write_bytes(b"not a picture")
    else:
        (pet / "annotations" / "trainval.txt").write_text("Abyssinian_1 one 1 1\n")
    with pytest.raises(SystemExit) as exit:
        vit.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")])
    assert exit.value.code.startswith("error: ")
    assert "Traceback" not in exit.value.code and "\n" not in exit.value.code
    if damage == "image":
        assert exit.value.code.startswith(f"error: cannot read {pet}/images/Abyssinian_2.jpg as an "
                                          "image: ")


def break_photos(photos, damage):
    if damage == "other classes":
        (photos / "test" / "dog").rename(photos / "test" / "dogs")
    elif damage == "empty class":
        (photos / "test" / "fox").mkdir()
        (photos / "train" / "fox" / ".hidden").mkdir(parents=True)
        (photos / "train" / "fox" / ".hidden" / "0.png").write_bytes(b"")
        (photos / "train" / "fox" / "notes.txt").write_text("no foxes yet")
    elif damage == "one class":
        shutil.rmtree(photos / "train" / "dog")
        shutil.rmtree(photos / "test" / "dog")
    elif damage == "no class":
        shutil.rmtree(photos / "train")
        (photos / "train" / ".ipynb_checkpoints").mkdir(parents=True)
    elif damage == "half an image":
        jpeg = photos / "test" / "dog" / "1.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
    elif damage == "no image":
        (photos / "train" / "cat" / "2023" / "3.png").write_text("a note saved as .png")
    elif damage == "too large":
        Image.new("L", (300, 200)).save(photos / "train" / "dog" / "large.png")


@pytest.mark.parametrize("damage, message", [
    ("other classes", "{photos}: only one of train/ and test/ holds ['dog', 'dogs']"),
    ("empty class", "{photos}/train/fox holds no images"),  # hidden files and notes are none
    ("one class", "{photos}/train needs two or more class folders"),
    ("no class", "{photos}/train needs two or more class folders"),
    ("half an image", "cannot read {photos}/test/dog/1.jpg as an image: "),  # truncated
    ("no image", "cannot read {photos}/train/cat/2023/3.png as an image: cannot identify image"),
    ("too large", "cannot read {photos}/train/dog/large.png as an image: Image size (60000 "
                  "pixels) exceeds limit of 20000 pixels"),
])
def test_broken_photos_exit_1_in_one_line_naming_the_folder_or_file(tmp_path, monkeypatch, damage,
                                                                    message, tiny):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # twice this stops PIL: a bomb
    photos = write_photos(tmp_path / "photos")
    break_photos(photos, damage)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path)
    assert exit.value.code.startswith("error: " + message.format(photos=photos))
    assert "\n" not in exit.value.code
    assert not (tmp_path / "out" / "vit.pt").exists()


def test_a_vit_pt_claimed_but_never_saved_is_explained_by_resume(tmp_path, monkeypatch):
    (tmp_path / "vit.pt").touch()  # as a run killed before its first epoch leaves it
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match="holds a run: go on with --resume"):
        vit.main(["--out-dir", str(tmp_path), "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        vit.main(["--out-dir", str(tmp_path), "--resume"])
    assert exit.value.code == (f"error: {tmp_path}/vit.pt holds no epoch yet: delete it if no run "
                               "is starting there")


def test_a_missing_checkpoint_for_resume_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit:
        vit.main(["--out-dir", str(tmp_path), "--resume"])
    assert exit.value.code == f"error: [Errno 2] No such file or directory: '{tmp_path}/vit.pt'"


def test_missing_dataset_from_the_shell_exits_1_without_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, str(HERE / "vit.py"), "--out-dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.startswith("error: Oxford-IIIT Pet could not be")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------- docs

def test_the_readme_shows_how_to_predict_and_the_lines_run(tmp_path, monkeypatch, capsys, tiny):
    run(tmp_path, "--epochs", "1")
    readme = (HERE / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    code = [block for block in blocks if "sys.argv" in block][0]  # the one that predicts
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["predict.py", str(tmp_path / "photos/test/dog/0.png")])
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r".*0\.png: (cat|dog) \d+\.\d %, (cat|dog) \d+\.\d %", line)


def test_the_readmes_training_example_uses_vits_functions_as_they_are(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", train=4, test=2)
    blocks = re.findall(r"```python\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    code = [block for block in blocks if "train(" in block][0]
    trained = {}

    def spy(model, train_data, test_data, **recipe):
        trained.update(recipe, config=model.config, shape=train_data[0].shape)
    monkeypatch.setattr(vit, "train", spy)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert trained == dict(epochs=100, flip=False, shape=(8, 3, 96, 96),
                           config=vit.MODEL | dict(num_classes=2, channels=3))


def test_resnet18_reference_runs_an_epoch(tmp_path, monkeypatch, capsys):
    write_photos(tmp_path / "photos")
    monkeypatch.setattr(sys, "argv", ["resnet18.py", "--data-dir", str(tmp_path / "photos"),
                                      "--epochs", "1", "--image-size", "32"])
    runpy.run_path(str(HERE / "docs" / "resnet18.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"ResNet-18, 1 epochs: test accuracy \d+\.\d% in \d+ s\n$", out)


def learned():
    """docs/learned.py as a module."""
    return runpy.run_path(str(HERE / "docs" / "learned.py"))


def test_attention_that_stays_home_has_distance_zero():
    code = learned()
    side, n = 3, 9
    weights = torch.zeros(2, 4, n + 1, n + 1)
    weights[:, :, :, 0] = 0.5  # half of every query's weight on the class token
    weights[:, :, 1:, 1:] += 0.5 * torch.eye(n)  # the rest on the patch itself
    weights[:, :, 0, 1:] = 0.5 / n
    distances = code["patch_distances"](side, patch_size=16)
    torch.testing.assert_close(code["mean_attention_distance"](weights, distances),
                               torch.zeros(2, 4))


def test_uniform_attention_has_the_grids_mean_pairwise_distance():
    code = learned()
    side, patch_size = 4, 12
    centres = [(row * patch_size, column * patch_size) for row in range(side)
               for column in range(side)]
    pairs = [((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 for a in centres for b in centres]
    expected = sum(pairs) / len(pairs)  # 16 x 16 ordered pairs, each patch with itself too
    weights = torch.rand(3, 2, 17, 17)
    weights[:, :, :, 1:] = 1.0  # the same weight on every patch, whatever the class token gets
    distances = code["patch_distances"](side, patch_size)
    got = code["mean_attention_distance"](weights, distances)
    torch.testing.assert_close(got, torch.full((3, 2), expected))


def test_orthogonal_positions_are_similar_only_to_themselves():
    code = learned()
    positions = torch.linalg.qr(torch.randn(32, 16))[0].T * torch.arange(1, 17).view(16, 1)
    similarity = code["position_similarity"](positions)  # rows of lengths 1 to 16
    torch.testing.assert_close(similarity, torch.eye(16), atol=1e-5, rtol=0)


def test_principal_components_of_the_patch_embedding_are_recovered_up_to_sign():
    code = learned()
    torch.manual_seed(0)
    components = torch.linalg.qr(torch.randn(48, 3))[0].T  # 3 orthonormal rows of 48 features
    # how much of each component each of 200 filters holds: uncorrelated, of falling strength
    spread = torch.randn(200, 3)
    strengths = torch.linalg.qr(spread - spread.mean(dim=0))[0] * torch.tensor([5.0, 2.0, 0.5])
    weight = strengths @ components + 3.0  # (200, 48), the same offset in every filter
    found = code["principal_components"](weight, count=3)
    torch.testing.assert_close((found * components).sum(dim=1).abs(), torch.ones(3), atol=1e-4,
                               rtol=0)


def test_filter_images_are_the_components_min_max_scaled_as_patches():
    code = learned()
    torch.manual_seed(0)
    model = tiny_vit(patch_size=4, image_size=16, dim=48)  # patches of 4 x 4 x 3 = 48 numbers
    images = code["filter_images"](model)  # (28, 4, 4, 3)
    first = code["principal_components"](model.patch_embed.proj.weight.detach())[0]
    expected = (first - first.min()) / (first.max() - first.min())
    assert images.shape == (28, 4, 4, 3) and images.min() == 0 and images.max() == 1
    torch.testing.assert_close(images[0], expected.view(3, 4, 4).permute(1, 2, 0))  # (c, p1, p2)


def test_mean_attention_distance_of_a_model_averages_its_kept_weights(tiny):
    code = learned()
    torch.manual_seed(0)
    model = tiny_vit(image_size=32, patch_size=8, depth=2, heads=2).eval()
    images = fake_data(70)[0]  # two batches of 64 and 6
    got = code["attention_distances"](model, images)  # (depth, heads)
    assert not any(block.attn.keep_weights for block in model.blocks)  # the fused kernel again
    for block in model.blocks:
        block.attn.keep_weights = True
    with torch.no_grad():
        model(vit.normalise(images))
    distances = code["patch_distances"](4, 8)
    for depth, block in enumerate(model.blocks):
        weights = block.attn.weights[:, :, 1:, 1:]
        weights = weights / weights.sum(-1, keepdim=True)
        expected = (weights * distances).sum(-1).mean(dim=(0, 2))  # over images and queries
        torch.testing.assert_close(got[depth], expected)


def test_learned_draws_figure_seven_beside_the_runs_own_start(tmp_path, monkeypatch, capsys,
                                                             tiny):
    started, train = [], vit.train

    def spy(model, *args, **recipe):  # the run's weights as training begins
        started.append(copy.deepcopy(model.state_dict()))
        return train(model, *args, **recipe)
    monkeypatch.setattr(vit, "train", spy)
    run(tmp_path, "--epochs", "1", "--seed", "7")
    code = learned()
    code["main"](["--out-dir", str(tmp_path / "out")])
    assert Image.open(tmp_path / "out" / "learned.png").size[0] > 1000
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'out' / 'learned.png'}\n")
    checkpoint = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    models = code["models"](checkpoint)
    for name, param in models["as it started"].state_dict().items():
        assert torch.equal(param, started[0][name]), name
    for name, param in models["trained"].state_dict().items():
        assert torch.equal(param, checkpoint["model"][name]), name
    positions = code["patch_positions"](models["trained"])  # 4 x 4 patches, no class token
    torch.testing.assert_close(positions, checkpoint["model"]["pos_embedding"][0, 1:])
    with pytest.raises(SystemExit, match="^error: .*vit.pt: FileNotFoundError"):
        code["main"](["--out-dir", str(tmp_path / "nothing")])


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_run_interrupted_and_resumed_is_the_uninterrupted_one(tmp_path, monkeypatch, tiny):
    whole = run(tmp_path / "whole", "--epochs", "2", "--device", "cuda")["history"]
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 1)
    with pytest.raises(SystemExit):
        run(tmp_path / "cut", "--epochs", "2", "--device", "cuda")
    monkeypatch.setattr(vit.ViT, "forward", ORIGINAL_FORWARD)
    vit.main(["--out-dir", str(tmp_path / "cut" / "out"), "--resume"])
    resumed = torch.load(tmp_path / "cut" / "out" / "vit.pt", weights_only=True)["history"]
    for key in whole:  # bf16 kernels may differ in the last bits from run to run
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-3, atol=1e-3)
