"""Tests for vit.py: CPU only, under a minute. Run: python -m pytest test_vit.py"""
import re
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

PETS3 = Path(__file__).resolve().parent.parent / "shared" / "data" / "pets3"
TINY = ["--image-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "2", "--heads", "2",
        "--mlp-dim", "64", "--batch-size", "8"]
STEPS_PER_EPOCH = 4  # write_photos' 32 training images in batches of 8


@pytest.fixture
def offline(monkeypatch):
    """No network, as in CI, also on a machine that has one."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


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


def write_photos(root, classes=("cat", "dog"), train=16, test=4):
    """Your own images: root/train/<class>/ and root/test/<class>/, a colour for each class, in
    several file types and modes, with the files that photo folders hold beside images."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 60, (30 + i, 40, 3), generator=generator)
                pixels = (noise + 150 * label).to(torch.uint8).numpy()
                mode, suffix = [("RGB", "png"), ("L", "jpg"), ("RGBA", "PNG")][i % 3]
                Image.fromarray(pixels).convert(mode).save(root / split / name / f"{i}.{suffix}")
            (root / split / name / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped
    (root / "train" / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")  # not images:
    (root / "train" / "dog" / "notes.txt").write_text("good dogs")  # skipped and counted
    shutil.copytree(root / "train" / "cat", root / "train" / ".ipynb_checkpoints")  # no class
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
    assert fused.shape == (3, 17, 48) and attention.weights is None
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
    torch.testing.assert_close(model.pos_embedding[0, 1:], vit.sincos_2d(4, 32))
    assert not model.pos_embedding[0, 0].any()


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


@pytest.mark.parametrize("images, got", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "torch.uint8 of shape (2, 3, 32, 32)"),
    (torch.zeros(2, 3, 30, 30), "torch.float32 of shape (2, 3, 30, 30)"),
    (torch.zeros(2, 1, 32, 32), "torch.float32 of shape (2, 1, 32, 32)"),
    (torch.zeros(3, 32, 32), "torch.float32 of shape (3, 32, 32)"),  # one image, not a batch
    (torch.zeros(1, 2, 3, 32, 32), "torch.float32 of shape (1, 2, 3, 32, 32)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.float64), "torch.float64 of shape (2, 3, 32, 32)"),
])
def test_the_model_refuses_images_it_cannot_read(images, got):
    expected = f"ViT takes torch.float32 images of shape (b, 3, 32, 32), not {got}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        tiny_vit()(images)


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


def test_own_photos_skip_hidden_folders_and_count_files_that_are_not_images(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos")
    (train_files, train_labels), (test_files, test_labels), classes = vit.open_data(photos)
    assert classes == ["cat", "dog"]  # not .ipynb_checkpoints
    assert len(train_files) == 32 and train_labels.tolist() == [0] * 16 + [1] * 16
    assert {file.parent.name for file in train_files} == {"cat", "dog"}
    assert len(test_files) == 8 and test_labels.tolist() == [0] * 4 + [1] * 4
    assert capsys.readouterr().out == (f"skipped 2 files in {photos / 'train'} that are not "
                                       "images, such as Thumbs.db\n")


def write_flat_photos(root, counts=(("cat", 10), ("dog", 6), ("fox", 2))):
    for name, count in counts:
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (20, 20), (10 * i, 100, 0)).save(root / name / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()
    return root


def test_a_folder_of_class_folders_holds_out_a_seeded_fifth_of_each_class(tmp_path, capsys):
    photos = write_flat_photos(tmp_path / "photos")
    (train, train_labels), (test, test_labels), classes = vit.open_data(photos, seed=0)
    assert classes == ["cat", "dog", "fox"]
    assert test_labels.tolist() == [0, 0, 1, 2]  # 2 of 10, 1 of 6, and at least 1 of 2
    assert train_labels.tolist() == [0] * 8 + [1] * 5 + [2]
    assert sorted(train + test) == sorted(photos.glob("*/*.png")) and not set(train) & set(test)
    assert all(file.parent.name == classes[label] for file, label in zip(test, test_labels))
    said = f"{photos} holds no train/ and test/: 4 of its images, a fifth of each class drawn by"
    assert capsys.readouterr().out == f"{said} --seed, are held out to test\n"
    assert vit.open_data(photos, seed=0)[1][0] == test  # the same split for the same seed
    assert vit.open_data(photos, seed=1)[1][0] != test


def test_a_class_folder_of_one_image_or_loose_images_are_refused(tmp_path, offline):
    photos = write_flat_photos(tmp_path / "photos", counts=(("cat", 3), ("dog", 1)))
    with pytest.raises(vit.UserError, match=f"^{photos}/dog holds one image: it cannot be both "
                                            "trained on and tested$"):
        vit.open_data(photos)
    loose = tmp_path / "loose"  # photos without class folders: not a place to download Pet to
    loose.mkdir()
    Image.new("RGB", (20, 20)).save(loose / "cat.jpg")
    with pytest.raises(vit.UserError, match=f"^{loose} needs two or more class folders, not 0$"):
        vit.open_data(loose)
    assert sorted(loose.iterdir()) == [loose / "cat.jpg"]


def test_images_are_read_as_a_person_sees_them(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)  # red on the left, blue on the right
    wide[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the picture turned a quarter clockwise
    Image.fromarray(wide).save(tmp_path / "phone.jpg", exif=exif)
    upright = np.asarray(vit.read_image(tmp_path / "phone.jpg"))
    assert upright.shape == (40, 20, 3)  # tall, as taken
    assert upright[5, 10, 0] > 200 and upright[35, 10, 2] > 200  # red above, blue below
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)  # 16 bits a pixel
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = np.asarray(vit.read_image(tmp_path / "deep.png"))
    assert (deep == (ramp >> 8).astype(np.uint8)[..., None]).all()  # not white
    palette = Image.fromarray(wide).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.png")
    assert (np.asarray(vit.read_image(tmp_path / "palette.png")) == wide).all()
    see_through = np.dstack([wide, np.zeros((20, 40), dtype=np.uint8)])  # transparent
    see_through[:, 30:, 3] = 255  # but for its right quarter
    Image.fromarray(see_through).save(tmp_path / "cutout.png")
    cutout = np.asarray(vit.read_image(tmp_path / "cutout.png"))
    assert (cutout[:, :30] == 255).all() and (cutout[:, 30:] == wide[:, 30:]).all()  # on white


def test_normalise_uses_imagenets_mean_and_std():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1).expand(2, 3, 4, 4)
    expected = torch.tensor([(0 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    torch.testing.assert_close(vit.normalise(images), expected.view(3, 1, 1).expand(2, 3, 4, 4))


# ------------------------------------------------------------------------------------- training

class Recorder(nn.Module):
    """A model that keeps the images it is trained on and guesses from their brightness."""
    def __init__(self):
        super().__init__()
        self.config = dict(num_classes=2)
        self.scale = nn.Parameter(torch.ones(2, 1))
        self.seen = []

    def forward(self, images):
        if self.training:
            self.seen.append(images)
        return (images.mean((1, 2, 3)) * self.scale).T  # (b, 2)


def horizontal_ramp(count=64, size=32):  # uint8, rising from 0 to 255 left to right
    return torch.linspace(0, 255, size).round().to(torch.uint8).expand(count, 3, size, size)


def train_on_ramps(**recipe):
    torch.manual_seed(0)
    model = Recorder()
    ramps = (horizontal_ramp(), torch.zeros(64, dtype=torch.long))
    vit.train(model, ramps, ramps, epochs=1, mix=False, trivial_augment=False, **recipe)
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


def test_trivial_augment_changes_each_image_by_one_op_only_when_asked():
    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)  # crops and mirrors leave it grey
    seen = {}
    for trivial_augment in (True, False):
        torch.manual_seed(0)
        model = Recorder()
        data = (grey, torch.zeros(64, dtype=torch.long))
        vit.train(model, data, data, epochs=1, mix=False, trivial_augment=trivial_augment)
        seen[trivial_augment] = torch.cat(model.seen)
    unchanged = (seen[True] - vit.normalise(grey[:1])).abs().amax((1, 2, 3)) < 1e-6
    assert 4 < (~unchanged).sum() < 64  # brighter, darker, sheared in from black, ...
    torch.testing.assert_close(seen[False], vit.normalise(grey))


def test_lr_warms_up_from_above_zero_to_the_peak_then_follows_a_cosine():
    lrs = [vit.lr_at(step, 1.0, warmup_steps=4, total_steps=20) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # the peak at the last warm-up step
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert 0 < lrs[-1] < 0.01
    assert vit.lr_at(0, 1.0, warmup_steps=0, total_steps=1) == 1.0  # a one-step run learns


def spy_on_adamw(monkeypatch):
    """Returns the list that each optimizer step adds its param groups' lr and decay to."""
    steps = []

    class AdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            steps.append([(group["lr"], group["weight_decay"]) for group in self.param_groups])
            return super().step(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    return steps


@pytest.mark.parametrize("epochs, warmup", [(20, 1), (10, 5)])  # at most a tenth of the run
def test_train_warms_up_over_an_epoch_then_follows_the_cosine(monkeypatch, epochs, warmup):
    steps = spy_on_adamw(monkeypatch)
    vit.train(tiny_vit(), fake_data(16), fake_data(16), epochs=epochs, batch_size=8, lr=0.01,
              warmup=warmup)
    lrs = [groups[0][0] for groups in steps]
    assert all(groups[1][0] == groups[0][0] for groups in steps)  # both groups alike
    assert len(lrs) == 2 * epochs  # 16 images in batches of 8
    assert lrs[:3] == [0.005, 0.01, 0.01]  # the warm-up's two steps, then the cosine from its peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.0001


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
        vit.train(model, data, data, epochs=3, batch_size=8, cutmix_share=cutmix_share,
                  trivial_augment=False)
        seen = torch.cat(model.seen)[:, 0]  # the red channel of each image trained on
        between = (seen - black).abs().gt(1e-4) & (seen - white).abs().gt(1e-4)
        one_colour = seen.amax((1, 2)) - seen.amin((1, 2)) < 1e-4
        if cutmix_share == 0:  # Mixup: every image blended evenly, some of them grey
            assert one_colour.all() and between.any()
        else:  # CutMix: a box of one image pasted into another, no grey
            assert not between.any() and not one_colour.all()


def test_train_refuses_images_that_are_not_uint8():
    images, labels = fake_data()
    for name, data in [("train_data", ((images / 255, labels), (images, labels))),
                       ("test_data", ((images, labels), (images.float(), labels)))]:
        with pytest.raises(ValueError, match=f"^{name} must hold uint8 images \\(0-255\\), not "
                                             "torch.float32$"):
            vit.train(tiny_vit(), *data, epochs=1)


def test_each_epoch_is_tested_and_logged(capsys, tmp_path):
    torch.manual_seed(0)
    history = vit.train(tiny_vit(), fake_data(), fake_data(), epochs=3, batch_size=8)
    assert len(history["train_loss"]) == len(history["test_loss"]) == len(history["test_acc"]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("test loss" in line and "test acc" in line and "min left" in line for line in lines)
    assert lines[2].endswith("0.0 min left")
    vit.plot_history(history, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size[0] > 300


# ---------------------------------------------------------------------------------- command line

def run(tmp_path, *args):
    """vit.py's command line on tmp_path/photos (written if missing); returns vit.pt."""
    if not (tmp_path / "photos").exists():
        write_photos(tmp_path / "photos")
    vit.main([*TINY, "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "photos"),
              *args])
    return torch.load(tmp_path / "out" / "vit.pt", weights_only=True)


def refuse_to_decode(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded images although the run should have stopped before")
    monkeypatch.setattr(vit, "load_images", fail)


def test_cli_writes_plots_and_a_checkpoint_that_scores_what_it_recorded(tmp_path, capsys):
    checkpoint = run(tmp_path, "--epochs", "2")
    assert checkpoint.keys() == {"model", "config", "options", "classes", "tested", "history",
                                 "optimizer", "rng"}
    assert checkpoint["classes"] == ["cat", "dog"] and checkpoint["config"]["num_classes"] == 2
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
    assert out.startswith(f"skipped 2 files in {tmp_path / 'photos' / 'train'} that are not images")
    assert "decoding 32 training and 8 test images" in out
    assert f"test accuracy {accuracy:.1%}, plots and vit.pt in {tmp_path / 'out'}\n" in out


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


def test_same_seed_same_history(tmp_path):
    first = run(tmp_path / "a", "--epochs", "2", "--seed", "3")["history"]
    second = run(tmp_path / "b", "--epochs", "2", "--seed", "3")["history"]
    other = run(tmp_path / "c", "--epochs", "2", "--seed", "4")["history"]
    assert first == second
    assert first["train_loss"] != other["train_loss"]


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
                                                                         capsys):
    uninterrupted = run(tmp_path / "whole", "--epochs", "3")["history"]
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 3)  # in epoch 2
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "cut", "--epochs", "3")
    assert exit.value.code == 130
    out = tmp_path / "cut" / "out"
    message = f"interrupted: {out}/vit.pt keeps the last whole epoch, --resume goes on"
    assert message in capsys.readouterr().err
    assert len(torch.load(out / "vit.pt", weights_only=True)["history"]["train_loss"]) == 1
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # the data folder is found from the checkpoint
    vit.main(["--out-dir", str(out), "--resume"])
    assert torch.load(out / "vit.pt", weights_only=True)["history"] == uninterrupted
    printed = capsys.readouterr().out.splitlines()
    resuming = printed.index("resuming at epoch 2 of 3")
    assert printed[resuming + 1].startswith("epoch 2/3 ") and len(printed) == resuming + 4
    refuse_to_decode(monkeypatch)  # a finished run: nothing to decode, nothing drawn again
    (out / "loss.png").unlink()
    vit.main(["--out-dir", str(out), "--resume"])
    accuracy = uninterrupted["test_acc"][-1]
    assert capsys.readouterr().out == (f"{out}/vit.pt holds a finished run: 3 epochs, test "
                                       f"accuracy {accuracy:.1%}\n")
    assert not (out / "loss.png").exists()


def test_a_folder_of_class_folders_trains_and_resumes_on_the_same_split(tmp_path, monkeypatch):
    photos = write_flat_photos(tmp_path / "photos")
    tested = []
    load_images = vit.load_images

    def spy(files, image_size):
        tested.append(files)
        return load_images(files, image_size)
    monkeypatch.setattr(vit, "load_images", spy)
    vit.main([*TINY, "--data-dir", str(photos), "--out-dir", str(tmp_path / "out"), "--seed", "5",
              "--epochs", "2"])
    assert len(tested) == 2
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert saved["classes"] == ["cat", "dog", "fox"] and saved["options"]["seed"] == 5
    # the held-out split, read back from vit.pt, is the one that was scored
    assert [photos / name for name in saved["tested"]] == tested[1] and len(tested[1]) == 4
    train, (files, labels), classes = vit.open_data(photos, seed=5)
    assert files == tested[1]
    model = vit.ViT(**saved["config"])
    model.load_state_dict(saved["model"])
    accuracy = vit.evaluate(model, load_images(files, 32), labels)[1]
    assert accuracy == saved["history"]["test_acc"][-1]
    saved["options"]["epochs"] = 3  # as if stopped after two of three epochs
    torch.save(saved, tmp_path / "out" / "vit.pt")
    shutil.copy(photos / "cat" / "0.png", photos / "cat" / "new.png")  # the split would move
    with pytest.raises(SystemExit, match="holds other classes or test images than the run in"):
        vit.main(["--out-dir", str(tmp_path / "out"), "--resume"])
    (photos / "cat" / "new.png").unlink()
    vit.main(["--out-dir", str(tmp_path / "out"), "--resume"])
    assert tested[2:] == tested[:2]  # the same training and test images
    assert len(torch.load(tmp_path / "out" / "vit.pt")["history"]["test_acc"]) == 3


def half_written(path):
    with open(path, "wb") as file:
        file.write(b"PK\x03\x04 the first bytes of a checkpoint")


def fail_the_second_save(monkeypatch, error):
    """The second checkpoint is half written, then error is raised, as a full disk or Ctrl-C do."""
    write_bytes, calls = Path.write_bytes, []

    def write(path, data):
        calls.append(path)
        if len(calls) == 2:
            half_written(path)
            raise error
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", write)


def test_ctrl_c_while_saving_reports_what_vit_pt_holds(tmp_path, monkeypatch, capsys):
    write_photos(tmp_path / "photos")
    fail_the_second_save(monkeypatch, KeyboardInterrupt())
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--epochs", "3")
    assert exit.value.code == 130
    assert "vit.pt keeps the last whole epoch, --resume goes on" in capsys.readouterr().err
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["test_acc"]) == 1


def test_full_disk_says_so_keeps_the_last_checkpoint_and_no_half_file(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos")
    fail_the_second_save(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--epochs", "3")
    out = tmp_path / "out"
    assert exit.value.code == f"error: {out}/vit.pt could not be saved: No space left on device"
    assert not (out / "vit.pt.tmp").exists()
    saved = torch.load(out / "vit.pt", weights_only=True)
    assert len(saved["history"]["train_loss"]) == 1


def test_ctrl_c_while_decoding_exits_130_saying_nothing_was_saved(tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(vit, "load_images", interrupt)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path)
    assert exit.value.code == 130
    assert "interrupted: nothing saved" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--epochs", "5"], ["--lr", "0.001"], ["--dim", "64"],
                                    ["--seed=1"], ["--batch-size", "8"]])
@pytest.mark.parametrize("mode", [["--resume"], ["--predict", "cat.jpg"]])
def test_resume_and_predict_refuse_every_option_but_where_things_are(tmp_path, capsys, option,
                                                                      mode):
    with pytest.raises(SystemExit) as exit:
        vit.main(["--out-dir", str(tmp_path), "--data-dir", "elsewhere", *mode, *option])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1
    assert ("--resume and --predict take the run's options: only --out-dir, --data-dir and "
            "--device go with them") in err


def test_resume_takes_a_new_data_dir_and_this_machines_device(tmp_path, monkeypatch):
    checkpoint = run(tmp_path, "--epochs", "1")
    checkpoint["options"]["epochs"] = 2  # as if stopped after one of two epochs
    checkpoint["options"]["device"] = "meta"  # made on another machine
    torch.save(checkpoint, tmp_path / "out" / "vit.pt")
    (tmp_path / "photos").rename(tmp_path / "moved")
    folders, open_data = [], vit.open_data

    def spy(data_dir, seed):
        folders.append(data_dir)
        return open_data(data_dir, seed)
    monkeypatch.setattr(vit, "open_data", spy)
    moved = str(tmp_path / "moved")
    vit.main(["--out-dir", str(tmp_path / "out"), "--resume", "--data-dir", moved])
    assert folders == [moved]
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["train_loss"]) == 2 and saved["options"]["epochs"] == 2
    assert saved["options"]["device"] == "cpu" and saved["options"]["data_dir"] == moved


def test_fresh_run_never_replaces_a_saved_one(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "vit.pt").write_bytes(b"forty epochs of work")
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match="holds a run: go on with --resume, or use another"):
        run(tmp_path)
    assert (tmp_path / "out" / "vit.pt").read_bytes() == b"forty epochs of work"


def test_nan_loss_stops_the_run_naming_the_epoch_and_keeps_the_last_checkpoint(tmp_path,
                                                                               monkeypatch):
    forward, calls = vit.ViT.forward, []

    def nan_in_epoch_two(self, images):
        calls.append(self.training)
        logits = forward(self, images)
        return logits * float("nan") if sum(calls) > STEPS_PER_EPOCH else logits
    monkeypatch.setattr(vit.ViT, "forward", nan_in_epoch_two)
    with pytest.raises(SystemExit, match="^error: the training loss is nan in epoch 2$"):
        run(tmp_path, "--epochs", "3")
    saved = torch.load(tmp_path / "out" / "vit.pt", weights_only=True)
    assert len(saved["history"]["train_loss"]) == 1


def test_cuda_out_of_memory_advises_a_smaller_batch(tmp_path, monkeypatch):
    interrupt_at_step(monkeypatch, 2, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried..."))
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--epochs", "1")
    assert exit.value.code == "error: cpu is out of memory: try a smaller --batch-size"


@pytest.mark.parametrize("mistake, error, message", [
    (lambda self, x: self.proj(x.transpose(1, 2)), RuntimeError, "mat1 and mat2 shapes cannot be"),
    (lambda self, x: dict(zip("qk", self.qkv(x).chunk(3, -1), strict=True)), ValueError,
     "zip\\(\\) argument 2 is longer than argument 1"),  # q, k, v unpacked as two
])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, mistake, error, message):
    monkeypatch.setattr(vit.Attention, "forward", mistake)  # a student's mistake in the shapes
    with pytest.raises(error, match=message):
        run(tmp_path, "--epochs", "1")


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint", b"PK\x03\x04truncated",
                                     "foreign"])
@pytest.mark.parametrize("mode", [["--resume"], ["--predict", "cat.jpg"]])
def test_a_missing_or_broken_checkpoint_exits_1_in_one_line(tmp_path, monkeypatch, content, mode):
    if content == "foreign":
        torch.save({"model": {}}, tmp_path / "vit.pt")
    elif content is not None:
        (tmp_path / "vit.pt").write_bytes(content)
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        vit.main(["--out-dir", str(tmp_path), *mode])
    assert exit.value.code.startswith(f"error: {tmp_path}/vit.pt holds no run of vit.py (")
    assert "\n" not in exit.value.code


@pytest.mark.parametrize("args, message", [
    (["--patch-size", "7"], "error: --patch-size 7 must divide --image-size 32$"),
    (["--heads", "3"], "error: --heads 3 must divide --dim 32$"),
    (["--out-dir", "{tmp}/file"], "^error: .*File exists"),
    (["--out-dir", "{tmp}/file/under"], "^error: .*Not a directory"),
    (["--out-dir", "{tmp}/photos/train/run"],
     "^error: --out-dir {tmp}/photos/train/run is inside --data-dir {tmp}/photos$"),
    (["--out-dir", "{tmp}/photos"], "^error: --out-dir {tmp}/photos is inside --data-dir"),
])
def test_what_does_not_fit_exits_in_one_line_before_decoding(tmp_path, monkeypatch, capsys, args,
                                                             message):
    (tmp_path / "file").write_text("a file, not a folder")
    refuse_to_decode(monkeypatch)
    write_photos(tmp_path / "photos")
    with pytest.raises(SystemExit) as exit:
        vit.main([*TINY, "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "photos"),
                  *[arg.format(tmp=tmp_path) for arg in args]])
    said = exit.value.code if exit.value.code != 2 else capsys.readouterr().err.strip()
    assert re.search(message.format(tmp=tmp_path), said) and "\n" not in said
    assert not (tmp_path / "photos" / "train" / "run").exists()


def test_a_folder_that_cannot_be_written_is_refused_before_decoding(tmp_path, monkeypatch):
    access = vit.os.access
    out = tmp_path / "out"

    def read_only(path, mode):  # as for a user without the right to write there
        return False if Path(path) == out else access(path, mode)
    monkeypatch.setattr(vit.os, "access", read_only)
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match=f"^error: --out-dir {out} is not writable$"):
        run(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: '0' is not a whole number above 0"),
    (["--depth", "-1"], "argument --depth: '-1' is not a whole number above 0"),
    (["--batch-size", "8.5"], "argument --batch-size: '8.5' is not a whole number above 0"),
    (["--lr", "0"], "--lr must be a positive number, not 0.0"),
    (["--lr", "nan"], "--lr must be a positive number, not nan"),
    (["--lr", "ten"], "argument --lr: invalid float value: 'ten'"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--device", "cuda"], "argument --device: invalid choice: 'cuda'"),
    (["--image-size", "30", "--patch-size", "8"], "--patch-size 8 must divide --image-size 30"),
])
def test_bad_options_are_one_line_errors_that_name_the_option(args, message, capsys):
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(SystemExit) as exit:
        vit.main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"error: {message}" in err and len(err.splitlines()) == 1


def test_help_describes_every_option_and_shows_the_recipes_defaults(capsys):
    with pytest.raises(SystemExit):
        vit.main(["--help"])
    help = capsys.readouterr().out
    entries = re.split(r"\n  (?=--)", help.split("options:")[1])[1:]  # one for each option
    described = {entry.split()[0]: entry.split("(default")[0] for entry in entries}
    assert {"--data-dir", "--device", "--resume", "--predict", "--patch-size"} <= described.keys()
    for option, text in described.items():  # each with words that say what it is for
        assert len(re.findall(r"\b[a-z]{3,}\b", text)) >= 2, option
    help = " ".join(help.split())
    recipe = vit.train.__kwdefaults__
    for default in (recipe["epochs"], recipe["batch_size"], recipe["lr"], 96, "out"):
        assert f"(default: {default})" in help
    assert "train/<class>/ and test/<class>/" in help


def test_missing_pet_without_network_says_what_to_do_in_one_line(tmp_path, offline):
    with pytest.raises(SystemExit) as exit:
        vit.main(["--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "out")])
    assert exit.value.code == (
        f"error: Oxford-IIIT Pet could not be read from or downloaded to {tmp_path / 'nothing'}/"
        "oxford-iiit-pet (<urlopen error no network in this test>): go online, put it there by "
        "hand, or use --data-dir with folders of your own images")
    assert not (tmp_path / "out" / "vit.pt").exists()  # the folder stays free for the next try


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
    if damage == "no test":
        shutil.rmtree(photos / "test")
    elif damage == "no train":
        shutil.rmtree(photos / "train")
    elif damage == "other classes":
        (photos / "test" / "dog").rename(photos / "test" / "dogs")
        (photos / "train" / "fox").mkdir()
        shutil.copy(photos / "train" / "cat" / "0.png", photos / "train" / "fox")
    elif damage == "empty class":
        (photos / "test" / "fox").mkdir()
        (photos / "train" / "fox").mkdir()
        (photos / "train" / "fox" / ".hidden.png").write_bytes(b"")
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
        (photos / "train" / "cat" / "3.png").write_text("a note saved as .png")
    elif damage == "too large":
        Image.new("L", (300, 200)).save(photos / "train" / "dog" / "large.png")


@pytest.mark.parametrize("damage, message", [
    ("no test", "[Errno 2] No such file or directory: '{photos}/test'"),
    ("no train", "[Errno 2] No such file or directory: '{photos}/train'"),
    ("other classes", "{photos} holds different class folders: train/dog train/fox against "
                      "test/dogs"),
    ("empty class", "{photos}/train/fox holds no images"),  # hidden files and notes are none
    ("one class", "{photos}/train needs two or more class folders, not 1"),
    ("no class", "{photos}/train needs two or more class folders, not 0"),
    ("half an image", "cannot read {photos}/test/dog/1.jpg as an image: "),  # truncated
    ("no image", "cannot read {photos}/train/cat/3.png as an image: cannot identify image file"),
    ("too large", "cannot read {photos}/train/dog/large.png as an image: Image size (60000 "
                  "pixels) exceeds limit of 20000 pixels"),
])
def test_broken_photos_exit_1_in_one_line_naming_the_folder_or_file(tmp_path, monkeypatch, damage,
                                                                    message):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # twice this stops PIL: a bomb
    photos = write_photos(tmp_path / "photos")
    break_photos(photos, damage)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path)
    assert exit.value.code.startswith("error: " + message.format(photos=photos))
    assert "\n" not in exit.value.code
    assert not (tmp_path / "out" / "vit.pt").exists()


def test_resume_refuses_data_with_other_classes(tmp_path, monkeypatch):
    checkpoint = run(tmp_path, "--epochs", "1")
    checkpoint["options"]["epochs"] = 2
    torch.save(checkpoint, tmp_path / "out" / "vit.pt")
    for split in ("train", "test"):
        (tmp_path / "photos" / split / "dog").rename(tmp_path / "photos" / split / "fox")
    refuse_to_decode(monkeypatch)
    with pytest.raises(SystemExit, match=f"^error: {tmp_path}/photos holds other classes or test "
                                         f"images than the run in {tmp_path}/out/vit.pt: --resume "
                                         "needs the data it began with$"):
        vit.main(["--out-dir", str(tmp_path / "out"), "--resume"])


def test_predict_prints_each_images_likeliest_classes(tmp_path, capsys):
    checkpoint = run(tmp_path, "--epochs", "2")
    photos = tmp_path / "photos" / "test"
    files = [photos / "cat" / "0.png", photos / "dog" / "1.jpg"]
    model = vit.ViT(**checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        chances = model.eval()(vit.normalise(vit.load_images(files, 32))).softmax(-1)
    capsys.readouterr()
    vit.main(["--out-dir", str(tmp_path / "out"), "--predict", *map(str, files)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for file, line, chance in zip(files, lines, chances):
        first, second = chance.argsort(descending=True).tolist()
        classes = checkpoint["classes"]
        assert line == (f"{file}: {classes[first]} {100 * chance[first]:.1f} %, "
                        f"{classes[second]} {100 * chance[second]:.1f} %")


def test_predict_turns_a_phone_photo_upright_as_the_test_split_is(tmp_path, capsys):
    run(tmp_path, "--epochs", "1")
    picture = Image.open(tmp_path / "photos" / "test" / "dog" / "0.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned a quarter clockwise: shown turned back
    picture.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "phone.png", exif=exif)
    capsys.readouterr()
    paths = [str(tmp_path / "photos" / "test" / "dog" / "0.png"), str(tmp_path / "phone.png")]
    vit.main(["--out-dir", str(tmp_path / "out"), "--predict", *paths])
    upright, turned = capsys.readouterr().out.splitlines()
    assert upright.split(": ")[1] == turned.split(": ")[1]


def test_predict_refuses_a_checkpoint_that_train_alone_saved(tmp_path):
    torch.manual_seed(0)
    vit.train(tiny_vit(), fake_data(), fake_data(), epochs=1, path=tmp_path / "vit.pt")
    with pytest.raises(SystemExit) as exit:
        vit.main(["--out-dir", str(tmp_path), "--predict", "cat.jpg"])
    assert exit.value.code == f"error: {tmp_path}/vit.pt holds no run of vit.py (KeyError)"


@pytest.mark.parametrize("image, message", [
    ("missing.jpg", "cannot read {tmp}/missing.jpg as an image: [Errno 2] No such file or "
                    "directory"),
    ("notes.txt", "cannot read {tmp}/notes.txt as an image: cannot identify image file"),
])
def test_predict_errors_are_one_line(tmp_path, image, message):
    run(tmp_path, "--epochs", "1")
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(SystemExit) as exit:
        vit.main(["--out-dir", str(tmp_path / "out"), "--predict", str(tmp_path / image)])
    assert exit.value.code.startswith("error: " + message.format(tmp=tmp_path))
    assert "\n" not in exit.value.code


def test_missing_dataset_from_the_shell_exits_1_without_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, str(Path(vit.__file__)), "--data-dir",
                           str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: Oxford-IIIT Pet could not be")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_run_interrupted_and_resumed_is_the_uninterrupted_one(tmp_path, monkeypatch):
    whole = run(tmp_path / "whole", "--epochs", "2", "--device", "cuda")["history"]
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 1)
    with pytest.raises(SystemExit):
        run(tmp_path / "cut", "--epochs", "2", "--device", "cuda")
    monkeypatch.undo()
    vit.main(["--out-dir", str(tmp_path / "cut" / "out"), "--resume"])
    resumed = torch.load(tmp_path / "cut" / "out" / "vit.pt", weights_only=True)["history"]
    for key in whole:  # bf16 kernels may differ in the last bits from run to run
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-3, atol=1e-3)
