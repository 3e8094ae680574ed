"""A Vision Transformer (Dosovitskiy et al., 2020) trained from scratch on Oxford-IIIT Pet.
Top to bottom: the model, the data, training, plots and the command line (--help)."""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T
from einops import rearrange
from torchvision.datasets import FakeData, OxfordIIITPet

# ------------------------------------------------------------------------------------ model
class PatchEmbedding(nn.Module):
    """Cut the image into p x p patches and project each to a token (as a stride-p convolution)."""
    def __init__(self, image_size, patch_size, channels, dim):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        self.patch_size = patch_size
        self.proj = nn.Linear(channels * patch_size**2, dim)

    def forward(self, images):  # (b, c, h, w)
        p = self.patch_size
        # n = (h / p) * (w / p) patches, row by row, each flattened in (c, p1, p2) order
        patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        return self.proj(patches)  # (b, n, dim)

class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d)) v in each head, then heads mixed."""
    def __init__(self, dim, heads):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"heads {heads} does not divide dim {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k and v of every head in one matrix multiply
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_weights=False):  # (b, n, dim)
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
        if return_weights:  # the explicit math, so that the weights can be looked at
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)  # (b, h, n, n)
            out = weights @ v  # (b, h, n, d)
        else:  # the same from one fused kernel, which never stores the weights
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)")), weights  # (b, n, dim)

class MLP(nn.Sequential):
    """Two linear layers with a GELU between, applied to each token on its own."""
    def __init__(self, dim, hidden_dim):
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x, return_weights=False):  # (b, n, dim)
        out, weights = self.attn(self.norm1(x), return_weights)
        x = x + out
        return x + self.mlp(self.norm2(x)), weights

class ViT(nn.Module):
    """Patch tokens and a class token, positions added, mixed by blocks; a head reads the class."""
    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=3):
        super().__init__()
        self.config = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes,
                           dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, channels=channels)
        for name, value in self.config.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.patch_embed = PatchEmbedding(image_size, patch_size, channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # a learned position for each patch and one for the class token
        self.pos_embedding = nn.Parameter(torch.zeros(1, (image_size // patch_size)**2 + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        # as timm's ViT: positions and linear weights truncated normal (std 0.02), biases zero
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images, return_weights=False):  # (b, c, h, w) float
        c, s = self.config["channels"], self.config["image_size"]
        if images.shape[1:] != (c, s, s) or images.dtype != self.cls_token.dtype:
            raise ValueError(f"expected {self.cls_token.dtype} images (batch, {c}, {s}, {s}), got "
                             f"{images.dtype} {tuple(images.shape)}: vit.normalise converts uint8")
        x = self.patch_embed(images)  # (b, n, dim)
        cls = self.cls_token.expand(len(x), -1, -1)  # (b, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (b, n + 1, dim)
        all_weights = []  # per block (b, heads, n + 1, n + 1), on the explicit path
        for block in self.blocks:
            x, weights = block(x, return_weights)
            all_weights.append(weights)
        logits = self.head(self.norm(x[:, 0]))  # (b, num_classes), from the class token
        return (logits, all_weights) if return_weights else logits

# our parameter names -> torchvision's (its MLP keeps a Dropout at index 2)
RENAMES = [("patch_embed.proj.", "conv_proj."), ("cls_token", "class_token"),
           ("pos_embedding", "encoder.pos_embedding"), ("blocks.", "encoder.layers.encoder_layer_"),
           ("norm1.", "ln_1."), ("norm2.", "ln_2."), ("mlp.2.", "mlp.3."), ("norm.", "encoder.ln."),
           ("attn.qkv.", "self_attention.in_proj_"), ("attn.proj.", "self_attention.out_proj."),
           ("head.", "heads.head.")]

def from_torchvision(tv, num_classes=None):
    """Our ViT with the weights of a torchvision VisionTransformer: it gives the same logits.
    With num_classes other than tv's, the head is new (zeros), ready for fine-tuning."""
    has_patch_conv = isinstance(getattr(tv, "conv_proj", None), nn.Conv2d)
    if not has_patch_conv or getattr(tv, "representation_size", None) is not None:
        raise ValueError("from_torchvision takes a ViT with a patch convolution and a linear head")
    new_head = num_classes is not None and num_classes != tv.num_classes
    model = ViT(tv.image_size, tv.patch_size, num_classes if new_head else tv.num_classes,
                tv.hidden_dim, len(tv.encoder.layers), tv.encoder.layers[0].num_heads, tv.mlp_dim)
    theirs = tv.state_dict()
    for name, param in model.state_dict().items():
        if new_head and name.startswith("head."):
            param.zero_()  # a new head, for fine-tuning, starts at zero
            continue
        their_name = name
        for our_part, their_part in RENAMES:
            their_name = their_name.replace(our_part, their_part)
        # the patch convolution's (dim, c, p, p) kernel is our (dim, c * p * p) matrix
        weight = theirs[their_name]
        if name == "patch_embed.proj.weight":
            weight = weight.flatten(1)
        if weight.shape != param.shape:
            shapes = f"{tuple(weight.shape)}, our {name} {tuple(param.shape)}"
            raise ValueError(f"torchvision's {their_name} is {shapes}")
        param.copy_(weight)
    return model

# ------------------------------------------------------------------------------------- data
MEAN = (0.485, 0.456, 0.406)  # ImageNet's mean and std per channel, as torchvision's weights
STD = (0.229, 0.224, 0.225)
PET_CLASSES = 37  # breeds in Oxford-IIIT Pet

def load_data(data_dir, split, image_size, workers, fake=False):
    """Pet's "trainval" or "test" split (downloaded if missing) or random images, each decoded,
    resized and centre-cropped once. Returns uint8 (n, 3, s, s), labels (n,), {label: breed}."""
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    if fake:
        count, offset = (256, 0) if split == "trainval" else (128, 256)
        dataset = FakeData(count, (3, image_size, image_size), PET_CLASSES, transform,
                           random_offset=offset)
    else:
        dataset = OxfordIIITPet(data_dir, split, transform=transform, download=True)
    images, labels = [], []
    for batch_images, batch_labels in torch.utils.data.DataLoader(dataset, 64, num_workers=workers):
        images.append(batch_images)
        labels.append(batch_labels)
        done = sum(map(len, labels))
        print(f"\rdecoding {split}: {done}/{len(dataset)} images", end="", flush=True)
    print()
    labels = torch.cat(labels)
    # Pet's classes are the breeds present, in label order (3 on a slice of Pet)
    names = dict(zip(sorted(set(labels.tolist())), getattr(dataset, "classes", [])))
    return torch.cat(images), labels, names

def normalise(images):  # uint8 (b, 3, s, s) -> float (b, 3, s, s), as the model takes them
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255 - mean) / std

def augment(images, min_scale=0.25):  # (b, c, s, s) float
    """A random resized crop (area min_scale..1, aspect 3/4..4/3) and a horizontal flip of each
    image, in one resampling."""
    b = len(images)
    area = torch.empty(b).uniform_(min_scale, 1)
    aspect = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    # the crop's width and height as a fraction of the side, its centre in [-1, 1]
    w = (area * aspect).sqrt().clamp(max=1)
    h = (area / aspect).sqrt().clamp(max=1)
    cx = (torch.rand(b) * 2 - 1) * (1 - w)
    cy = (torch.rand(b) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
    # output to input coordinates: x_in = flip * w * x_out + cx, y_in = h * y_out + cy
    theta = torch.stack([flip * w, 0 * w, cx, 0 * h, h, cy], dim=1).view(b, 2, 3)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)

def mixer(num_classes):
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019), each half the time: each image of
    a batch is blended with, or has a box pasted in from, another, and its target mixed alike."""
    mixup = T.MixUp(alpha=0.8, num_classes=num_classes)
    return T.RandomChoice([mixup, T.CutMix(alpha=1.0, num_classes=num_classes)])

def batches(images, labels, batch_size, train=False):  # uint8 images and labels, on the device
    """Normalised mini-batches; for training shuffled, augmented, and whole batches only."""
    order = torch.randperm(len(images)) if train else torch.arange(len(images))
    order = order.to(images.device)
    # training drops the last partial batch, unless it is the only one
    end = max(len(images) // batch_size, 1) * batch_size if train else len(images)
    for start in range(0, end, batch_size):
        indices = order[start:start + batch_size]
        x = normalise(images[indices])  # (b, 3, s, s)
        yield (augment(x) if train else x), labels[indices]

# --------------------------------------------------------------------------------- training
def autocast(device):  # bf16 matrix multiplies on CUDA, float32 everywhere else
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

def train_step(model, optimizer, images, targets, label_smoothing):  # the model in train mode
    with autocast(images.device):
        loss = F.cross_entropy(model(images), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()

@torch.no_grad()
def evaluate(model, images, labels, batch_size):  # mean cross-entropy, accuracy (a fraction)
    model.eval()
    logits = []
    for x, _ in batches(images, labels, batch_size):
        with autocast(x.device):
            logits.append(model(x).float())
    logits = torch.cat(logits)  # (n, classes)
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item(), accuracy

def lr_at(step, peak, warmup_steps, total_steps):
    """A linear warm-up that reaches the peak at its last step, then a cosine towards zero."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2

def write_whole(path, write, replace=True):
    """write(file) under a name of this process's own, then rename it to path: no one ever sees
    half a file. With replace=False, FileExistsError if path exists, so no run replaces another."""
    temporary = Path(f"{path}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

def train(model, train_data, test_data, epochs, batch_size, lr=3e-4, weight_decay=0.05, warmup=5,
          label_smoothing=0.1, test_every=5, compile=False, path=None, options=None, resume=None):
    """AdamW on Mixup/CutMix targets; lr warm-up for `warmup` epochs (a tenth of a shorter run),
    then a cosine. The test split is scored every `test_every` epochs and after the last. Each
    epoch is saved to `path` with the run's `options`, and `resume` goes on from such a
    checkpoint. Ctrl-C stops early. Returns the history: one list per quantity."""
    if type(test_every) is not int or test_every < 1:
        raise ValueError(f"test_every must be a positive integer, got {test_every!r}")
    # weight matrices decay; biases, norms, the class token and the positions do not
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay}]
    optimizer = torch.optim.AdamW(groups, lr, weight_decay=0.0)
    mix = mixer(model.config["num_classes"])
    epoch_keys = ("train_loss", "lr", "images_per_s")  # one value per epoch
    test_keys = ("test_epoch", "test_loss", "test_acc")  # one value per test
    history = {key: [] for key in epoch_keys + test_keys}
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history = resume["history"]
        # an older vit.py's checkpoint has no test_epoch: it tested after every epoch
        history.setdefault("test_epoch", list(range(1, len(history["test_acc"]) + 1)))
        torch.set_rng_state(resume["rng"])

    def save(replace=True):  # all that --resume needs to go on as if never stopped
        checkpoint = {"model": model.state_dict(), "config": model.config, "history": history,
                      "options": options, "optimizer": optimizer.state_dict(),
                      "rng": torch.get_rng_state()}
        write_whole(path, lambda file: torch.save(checkpoint, file), replace)

    if path and not resume:
        save(replace=False)  # claims path: FileExistsError if another run took it meanwhile
    compiled = torch.compile(model) if compile else model
    steps = max(len(train_data[0]) // batch_size, 1)  # per epoch
    warmup_steps = int(min(warmup, epochs / 10) * steps)
    first_epoch = len(history["train_loss"])
    started = time.perf_counter()
    try:
        for epoch in range(first_epoch, epochs):
            compiled.train()  # evaluate() left it in eval mode
            loss_sum = 0.0
            epoch_started = time.perf_counter()
            for i, (images, labels) in enumerate(batches(*train_data, batch_size, train=True)):
                step_lr = lr_at(epoch * steps + i, lr, warmup_steps, epochs * steps)
                for group in optimizer.param_groups:
                    group["lr"] = step_lr
                loss_sum += train_step(compiled, optimizer, *mix(images, labels), label_smoothing)
            train_loss = loss_sum.item() / steps  # .item() waits for the device: a fair clock
            images_per_s = steps * len(images) / (time.perf_counter() - epoch_started)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"the training loss is {train_loss} in epoch {epoch + 1}, "
                                         f"stopped: {path} keeps the run up to epoch {epoch}")
            tested = (epoch + 1) % test_every == 0 or epoch + 1 == epochs
            scores = ""
            if tested:  # scored before the history grows: a Ctrl-C here leaves it as saved
                test_loss, test_acc = evaluate(compiled, *test_data, batch_size)
                scores = f"test loss {test_loss:.3f}  test acc {test_acc:.1%}  "
            for key, value in zip(epoch_keys, (train_loss, step_lr, images_per_s)):
                history[key].append(value)
            if tested:
                for key, value in zip(test_keys, (epoch + 1, test_loss, test_acc)):
                    history[key].append(value)
            if path:
                save()
            per_epoch = (time.perf_counter() - started) / (epoch + 1 - first_epoch)
            left = per_epoch * (epochs - epoch - 1)
            print(f"epoch {epoch + 1:3d}/{epochs}  train loss {train_loss:.3f}  {scores}"
                  f"{images_per_s:4.0f} img/s  {left / 60:4.1f} min left", flush=True)
    except KeyboardInterrupt:
        pass  # the checkpoint keeps the last whole epoch
    return history

# ------------------------------------------------------------------------------------ plots
def attention_rollout(weights):  # per block (b, heads, n + 1, n + 1) -> (b, side, side)
    """Where the class token looks: attention rolled out through all blocks (Abnar & Zuidema,
    2020), heads averaged, the residual path counted as (A + I) / 2. Each map sums to 1."""
    identity = torch.eye(weights[0].shape[-1], device=weights[0].device)
    rollout = identity
    for block_weights in weights:
        rollout = (block_weights.float().mean(dim=1) + identity) / 2 @ rollout  # (b, n+1, n+1)
    cls_row = rollout[:, 0, 1:]  # (b, n): the class token's row, over the patches
    side = math.isqrt(cls_row.shape[-1])
    return (cls_row / cls_row.sum(-1, keepdim=True)).view(-1, side, side)

def save_figure(figure, path):  # written whole, like the checkpoint
    write_whole(path, lambda file: figure.savefig(file, format="png", dpi=100, bbox_inches="tight"))
    plt.close(figure)

def plot_patches(image, patch_size, path):  # uint8 (3, s, s)
    patches = rearrange(image, "c (h p1) (w p2) -> h w c p1 p2", p1=patch_size, p2=patch_size)
    framed = F.pad(patches, (1, 1, 1, 1), value=255)  # a white frame around each patch
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4.5))
    left.imshow(image.permute(1, 2, 0).numpy())
    left.set_title(f"image, {image.shape[-1]} px")
    right.imshow(rearrange(framed, "h w c p1 p2 -> (h p1) (w p2) c").numpy())
    right.set_title(f"{patches.shape[0] * patches.shape[1]} patches of {patch_size} px")
    for axis in (left, right):
        axis.axis("off")
    save_figure(figure, path)

def plot_history(history, path):  # the test split's points are the epochs it was scored after
    epochs = range(1, len(history["train_loss"]) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, history["train_loss"], label="train (augmented, mixed)")
    left.plot(history["test_epoch"], history["test_loss"], ".-", label="test")
    left.set(xlabel="epoch", ylabel="cross-entropy loss")
    left.legend()
    right.plot(history["test_epoch"], history["test_acc"], ".-")
    right.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    save_figure(figure, path)

@torch.no_grad()
def plot_attention(model, images, labels, names, path):  # uint8 (k, 3, s, s), (k,)
    """Each image with its true and predicted breed, and where the class token looks."""
    model.eval()
    device = next(model.parameters()).device
    logits, weights = model(normalise(images.to(device)), return_weights=True)
    maps = attention_rollout(weights)[:, None]  # (k, 1, s/p, s/p), stretched to (k, 1, s, s)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear").cpu()
    figure, axes = plt.subplots(2, len(images), figsize=(2.6 * len(images), 5.6), squeeze=False)
    for i, (label, guess) in enumerate(zip(labels.tolist(), logits.argmax(-1).tolist())):
        title = f"{names.get(label, label)}\npredicted: {names.get(guess, guess)}"
        axes[0, i].set_title(title, color="green" if guess == label else "red", fontsize=9)
        axes[0, i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(maps[i, 0].numpy(), cmap="inferno", alpha=0.6)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("class-token attention, rolled out over all blocks")
    save_figure(figure, path)

# ----------------------------------------------------------------------------- command line
# the model's sizes and the recipe were chosen on pets3: docs/experiments.md
# --resume takes these anew (--data-dir only when given); every other option is the run's own
RENEWABLE = {"data_dir", "out_dir", "device", "workers", "resume"}
DEFAULTS = dict(data_dir="./data", out_dir="./out", epochs=220, batch_size=8, image_size=96,
                patch_size=12, dim=128, depth=4, heads=4, mlp_dim=256, lr=3e-4, seed=0,
                device="auto", workers=min(8, os.cpu_count() or 1), fake_data=False,
                compile=False, pretrained=False, resume=False)
SIZES = {"image_size", "patch_size", "dim", "depth", "heads", "mlp_dim"}

def parse_args(argv=None):
    """The run's options and, with --resume, its checkpoint: a resumed run keeps its options."""
    # no defaults in the parser: it returns what was given, and nothing else
    flags = ("--fake-data: random images, to try it offline. --compile: torch.compile the model. "
             "--pretrained: fine-tune torchvision's ImageNet ViT-B/16 (lr 3e-5). --resume: go on "
             "with the run in --out-dir, with its own options. README.md says more.")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=flags,
                                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if type(default) is bool:
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(default), help=f"default: {default}")
    given = vars(parser.parse_args(argv))
    args = argparse.Namespace(**(DEFAULTS | given))
    if args.resume:
        checkpoint = load_checkpoint(Path(args.out_dir) / "vit.pt")
        # only where things are may be given anew: any other option must be the run's own
        for name in sorted(given.keys() - RENEWABLE):
            if given[name] != checkpoint["options"][name]:
                saved = checkpoint["options"][name]
                parser.error(f"--{name.replace('_', '-')} {given[name]} differs from the resumed "
                             f"run's {saved}: a resumed run keeps its options")
        renewed = {name: getattr(args, name) for name in RENEWABLE if name != "data_dir"}
        if "data_dir" in given:
            renewed["data_dir"] = args.data_dir
        args = argparse.Namespace(**(checkpoint["options"] | renewed))
    if args.pretrained and not args.resume:
        if given.keys() & SIZES:
            parser.error("--pretrained takes ViT-B/16's sizes: leave out --image-size, --dim, ...")
        if "lr" not in given:
            args.lr = 3e-5  # fine-tuning takes smaller steps
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if args.device == "auto":
        args.device = next((device for device, ok in available.items() if ok), "cpu")
    checks = [(min(args.epochs, args.batch_size) >= 1, "--epochs and --batch-size must be >= 1"),
              (0 < args.lr < 1, f"--lr must be in (0, 1), got {args.lr}"),
              (0 <= args.seed < 2**32, f"--seed must be from 0 to 2**32 - 1, got {args.seed}"),
              (args.workers >= 0, f"--workers must be 0 or more, got {args.workers}"),
              (available.get(args.device.split(":")[0], args.device == "cpu"),
               f"no --device {args.device} here")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:  # the model's own checks, on a model that takes no memory
        with torch.device("meta"):
            ViT(args.image_size, args.patch_size, 1, args.dim, args.depth, args.heads, args.mlp_dim)
    except ValueError as error:
        parser.error(str(error))
    args.data_dir = os.path.abspath(args.data_dir)  # so that --resume finds it from anywhere
    return args, (checkpoint if args.resume else None)

def load_checkpoint(path):  # onto the CPU, from where any device can go on
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        sys.exit(f"error: --resume found no vit.py checkpoint at {path} ({type(error).__name__})")
    keys = {"model", "config", "history", "options", "optimizer", "rng"}
    if not isinstance(checkpoint, dict) or not keys <= checkpoint.keys():
        sys.exit(f"error: --resume found no vit.py checkpoint at {path} (it has other keys)")
    return checkpoint

def run(args, checkpoint):  # main() turns what goes wrong here into one-line messages
    out = Path(args.out_dir)
    if (out / "vit.pt").exists() and not checkpoint:
        sys.exit(f"error: {out}/vit.pt holds a run: go on with --resume, or use another --out-dir")
    try:  # an unwritable --out-dir shows now, not after decoding
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"vit.pt.{os.getpid()}.tmp"  # the name the checkpoint is written under
        probe.touch()
        probe.unlink()
    except OSError as error:
        sys.exit(f"error: cannot write to --out-dir {out} ({error.strerror})")
    if args.pretrained and not checkpoint:
        try:
            pretrained = torchvision.models.vit_b_16(weights="IMAGENET1K_V1")
        except (OSError, RuntimeError) as error:
            sys.exit(f"error: could not download torchvision's ViT-B/16 weights ({error}): connect "
                     "once (torch keeps them) or train without --pretrained")
        args.image_size = pretrained.image_size
    try:
        data = [load_data(args.data_dir, split, args.image_size, args.workers, args.fake_data)
                for split in ("trainval", "test")]
    except (OSError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[-1]  # a decoding worker's error has a traceback
        sys.exit(f"error: could not load Oxford-IIIT Pet from {args.data_dir} ({reason}): point "
                 "--data-dir at the folder that holds oxford-iiit-pet, or try --fake-data")
    torch.manual_seed(args.seed)
    if checkpoint:
        model = ViT(**checkpoint["config"])
    elif args.pretrained:
        model = from_torchvision(pretrained, PET_CLASSES)
    else:
        model = ViT(args.image_size, args.patch_size, PET_CLASSES, args.dim, args.depth,
                    args.heads, args.mlp_dim)
    # the options record the model's sizes, ViT-B/16's too
    vars(args).update({name: model.config[name] for name in SIZES})
    model = model.to(args.device)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"ViT {model.config}: {parameters:.2f} M parameters, on {args.device}")
    (train_images, train_labels, _), (images, labels, names) = data
    train_data = (train_images.to(args.device), train_labels.to(args.device))
    test_data = (images.to(args.device), labels.to(args.device))
    history = train(model, train_data, test_data, args.epochs, args.batch_size, args.lr,
                    compile=args.compile, path=out / "vit.pt", options=vars(args),
                    resume=checkpoint)
    plot_patches(images[0], model.config["patch_size"], out / "patches.png")
    plot_history(history, out / "loss.png")
    shown = torch.linspace(0, len(images) - 1, 4).long()
    plot_attention(model, images[shown], labels[shown], names, out / "attention.png")
    done = len(history["train_loss"])
    if done < args.epochs:
        # train() stopped on Ctrl-C; the plots are written now
        raise KeyboardInterrupt(f"{out}/vit.pt keeps {done} of {args.epochs} epochs, --resume "
                                "goes on")
    print(f"test accuracy {history['test_acc'][-1]:.1%}, plots and checkpoint in {out}/")

def main(argv=None):
    path = None
    try:
        args, checkpoint = parse_args(argv)
        path = Path(args.out_dir) / "vit.pt"
        if checkpoint and len(checkpoint["history"]["train_loss"]) >= args.epochs:
            print(f"{path} is a finished run of {args.epochs} epochs: there is nothing to resume "
                  "(a new run needs another --out-dir)")
            return
        run(args, checkpoint)
    except KeyboardInterrupt as interrupt:
        kept = f"{path} is as it was" if path and path.exists() else "no checkpoint written"
        print(f"\ninterrupted: {str(interrupt) or kept}", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as error:
        sys.exit(f"error: {error} (to try other options, start again in another --out-dir)")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of memory: try a smaller --batch-size, in another --out-dir")
    except OSError as error:
        sys.exit(f"error: {error}")

if __name__ == "__main__":
    main()
