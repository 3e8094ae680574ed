"""A Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020) from scratch, on Oxford-IIIT Pet.
Top to bottom: the model (patches -> tokens -> blocks -> class token -> head), data, training, plots, command line."""
import argparse
import contextlib
import copy
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
import torchvision.transforms as T
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets import FakeData, OxfordIIITPet

# ---------------------------------------------------------------------------------------- model
class PatchEmbedding(nn.Module):
    """Cut the image into p x p patches, flatten each in (c, p1, p2) order and project it to a token:
    exactly a convolution with kernel p and stride p, written as the paper says it."""
    def __init__(self, image_size, patch_size, channels, dim):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.proj = nn.Linear(channels * patch_size**2, dim)

    def forward(self, images):  # (b, c, h, w)
        c, s = self.channels, self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"expected images of shape (batch, {c}, {s}, {s}), got {tuple(images.shape)}")
        p = self.patch_size  # n = (h / p) * (w / p) patches, read row by row
        patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)  # (b, n, c*p*p)
        return self.proj(patches)  # (b, n, dim)

class Attention(nn.Module):
    """Multi-head self-attention: in each head softmax(q k^T / sqrt(d)) v, the heads concatenated and projected."""
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)  # qkv: q, k, v of every head in one matmul

    def forward(self, x, return_weights=False):  # (b, n, dim)
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)  # (b, h, n, d) each
        if return_weights:  # the explicit math, so that the attention weights can be looked at
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # (b, h, n, n)
            out = weights @ v  # (b, h, n, d)
        else:  # the same result from one fused kernel, without storing the (n, n) weights
            weights, out = None, F.scaled_dot_product_attention(q, k, v)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))  # heads side by side, then mixed: (b, n, dim)
        return out, weights  # (b, n, dim), (b, h, n, n) or None

class MLP(nn.Sequential):
    """Two linear layers with a GELU between, applied to every token on its own: (b, n, dim) -> (b, n, dim)."""
    def __init__(self, dim, hidden_dim):
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, mlp_dim)

    def forward(self, x, return_weights=False):  # (b, n, dim)
        out, weights = self.attn(self.norm1(x), return_weights)
        x = x + out
        x = x + self.mlp(self.norm2(x))
        return x, weights  # (b, n, dim), (b, heads, n, n) or None

class ViT(nn.Module):
    """Patch tokens plus a class token, positions added, mixed by the blocks; a linear head reads the class token."""
    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=3):
        super().__init__()
        self.config = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim,
                           depth=depth, heads=heads, mlp_dim=mlp_dim, channels=channels)
        self.patch_embed = PatchEmbedding(image_size, patch_size, channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, dim))  # n patches + cls
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        for linear in (m for m in self.modules() if isinstance(m, nn.Linear)):  # as torchvision and timm do
            nn.init.trunc_normal_(linear.weight, std=0.02), nn.init.zeros_(linear.bias)

    def forward(self, images, return_weights=False):  # (b, c, h, w); weights: the explicit attention path
        x = self.patch_embed(images)  # (b, n, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (b, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (b, n + 1, dim)
        weights = []
        for block in self.blocks:
            x, w = block(x, return_weights)
            weights.append(w)
        logits = self.head(self.norm(x[:, 0]))  # (b, num_classes), read from the class token
        return (logits, weights) if return_weights else logits

def from_torchvision(tv, num_classes=None):
    """Our ViT with the weights of a torchvision.models.VisionTransformer: it gives the same logits.
    With num_classes other than tv's, the head is new (zeros), ready for fine-tuning."""
    if tv.representation_size is not None or "conv_proj" not in tv._modules:
        raise ValueError("from_torchvision takes a ViT with a patch convolution and a plain linear head")
    model = ViT(tv.image_size, tv.patch_size, tv.num_classes, tv.hidden_dim, len(tv.encoder.layers),
                tv.encoder.layers[0].num_heads, tv.mlp_dim)
    renames = [("patch_embed.proj.", "conv_proj."), ("cls_token", "class_token"), ("norm.", "encoder.ln."),
               ("pos_embedding", "encoder.pos_embedding"), ("blocks.", "encoder.layers.encoder_layer_"),
               ("norm1.", "ln_1."), ("norm2.", "ln_2."), ("mlp.2.", "mlp.3."), ("attn.qkv.", "self_attention.in_proj_"),
               ("attn.proj.", "self_attention.out_proj."), ("head.", "heads.head.")]
    theirs, ours = tv.state_dict(), model.state_dict()
    for name, param in ours.items():
        for our, their in renames:
            name = name.replace(our, their)  # our name -> torchvision's (its MLP has a Dropout at index 2)
        param.copy_(theirs[name].reshape(param.shape))  # the patch convolution's (dim, c, p, p) becomes (dim, c*p*p)
    if num_classes is not None and num_classes != tv.num_classes:
        model.head, model.config["num_classes"] = nn.Linear(tv.hidden_dim, num_classes), num_classes
        nn.init.zeros_(model.head.weight), nn.init.zeros_(model.head.bias)
    return model

# ----------------------------------------------------------------------------------------- data
MEAN, STD, PET_CLASSES = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 37  # ImageNet's mean and std; 37 breeds

def load_data(data_dir, split, image_size, workers, fake=False):
    """Oxford-IIIT Pet, downloaded when missing, or with fake=True torchvision's FakeData of the same shape. Each
    image is decoded once, resized and centre-cropped: uint8 (n, 3, s, s), labels (n,), cached in data_dir."""
    cache = Path(data_dir) / f"pet-{split}-{image_size}px.pt"
    if cache.exists() and not fake:
        return torch.load(cache, weights_only=True)
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    size, offset = (256, 0) if split == "trainval" else (128, 256)  # fake data: 256 trainval and 128 test images
    dataset = (FakeData(size, (3, image_size, image_size), PET_CLASSES, transform, random_offset=offset) if fake
               else OxfordIIITPet(data_dir, split, transform=transform, download=True))
    images, labels = [], []
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers):
        images.append(x), labels.append(y)
        print(f"\rdecoding {split}: {sum(map(len, labels))}/{len(dataset)} images", end="", flush=True)
    print()
    data = torch.cat(images), torch.cat(labels)
    if not fake:
        with contextlib.suppress(OSError):  # a read-only data folder: decode again next time
            write_whole(cache, lambda f: torch.save(data, f))
    return data

def normalise(images):  # uint8 (b, 3, s, s) -> float (b, 3, s, s), as the model sees them
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (MEAN, STD))
    return (images.float() / 255 - mean) / std

def augment(x, min_scale=0.25):  # (b, c, s, s) float
    """Random resized crop (area min_scale..1, aspect 3/4..4/3) and horizontal flip of each image, in one resampling."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(min_scale, 1)
    aspect = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # crop size, fraction of side
    cx, cy = (torch.rand(b) * 2 - 1) * (1 - w), (torch.rand(b) * 2 - 1) * (1 - h)  # crop centre, in [-1, 1]
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)  # output to input coordinates: x_in = flip * w * x_out + cx, y_in = h * y_out + cy
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = flip * w, cx, h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)  # (b, s, s, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

def mix(x, y, num_classes):  # (b, c, s, s) float, (b,) labels
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019), each half the time: every image is blended with, or
    has a box pasted in from, another image of the batch, and its target is mixed in the same proportion."""
    s, other = x.shape[-1], torch.randperm(len(x), device=x.device)
    if torch.rand(()) < 0.5:  # mixup: lam of this image and 1 - lam of the other, lam ~ Beta(0.8, 0.8)
        lam = torch.distributions.Beta(0.8, 0.8).sample().item()
        x = lam * x + (1 - lam) * x[other]
    else:  # cutmix: a box of about 1 - lam of the area, lam ~ Uniform(0, 1), centred anywhere, cut at the border
        half, (cy, cx) = int(s * math.sqrt(1 - torch.rand(()).item())) // 2, torch.randint(s, (2,)).tolist()
        y0, y1, x0, x1 = max(cy - half, 0), min(cy + half, s), max(cx - half, 0), min(cx + half, s)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[other, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / s**2  # the share of each image that is still its own
    return x, lam * F.one_hot(y, num_classes) + (1 - lam) * F.one_hot(y[other], num_classes)  # (b, classes) targets

class Batches:
    """Mini-batches from uint8 images kept on the device; for training shuffled, and augmented a batch at a time."""
    def __init__(self, images, labels, batch_size, device, train=False):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.train = batch_size, train

    def __len__(self):  # training drops the last incomplete batch, so every step sees batch_size images
        n = len(self.images)
        return max(1, n // self.batch_size) if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.images)) if self.train else torch.arange(len(self.images))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size].to(self.images.device)
            x = normalise(self.images[idx])  # (b, 3, s, s)
            yield (augment(x) if self.train else x), self.labels[idx]

# ------------------------------------------------------------------------------------- training
def write_whole(path, write):  # to a temporary name, then renamed: a crash never leaves half a file behind
    write(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)

def train_step(model, opt, x, y, label_smoothing):  # the model in train mode
    with torch.autocast(x.device.type, torch.bfloat16, enabled=x.device.type == "cuda"):
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()

@torch.no_grad()
def evaluate(model, loader):  # mean cross-entropy and accuracy (a fraction) over a loader
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=x.device.type == "cuda"):
            logits.append(model(x).float()), labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)  # (n, classes), (n,)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()

def train(model, train_loader, test_loader, epochs, lr=3e-4, weight_decay=0.05, warmup=5, label_smoothing=0.1,
          compile=False, checkpoint=None, resume=None):
    """AdamW on cross-entropy against Mixup/CutMix targets; the lr warms up linearly for `warmup` epochs (a tenth of a
    shorter run), then decays to zero on a cosine. Each epoch is saved to `checkpoint`, and `resume` goes on from such
    a state. Ctrl-C stops, keeps the last whole epoch. Returns the history: a list per quantity, one entry an epoch."""
    decay = [p for p in model.parameters() if p.ndim == 2]  # weight matrices decay; biases, norms, cls, pos do not
    rest = [p for p in model.parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}], lr)
    history = {key: [] for key in ("train_loss", "test_loss", "test_acc", "lr", "train_images_per_s")}
    if resume:  # model, optimiser, history and random numbers as they were after the saved epoch
        model.load_state_dict(resume["model"]), opt.load_state_dict(resume["optimizer"])
        history.update(resume["history"]), torch.set_rng_state(resume["rng"])
    fast = torch.compile(model) if compile else model
    steps, warmup_steps = epochs * len(train_loader), min(warmup, epochs / 10) * len(train_loader)
    start, t_start = len(history["test_acc"]), time.perf_counter()
    try:
        for epoch in range(start, epochs):
            fast.train()  # evaluate() left it in eval mode
            total, t0 = 0.0, time.perf_counter()
            for i, (x, y) in enumerate(train_loader):
                step = epoch * len(train_loader) + i
                scale = step / warmup_steps if step < warmup_steps else 0.5 * (1 + math.cos(math.pi * step / steps))
                for group in opt.param_groups:
                    group["lr"] = lr * scale
                total += train_step(fast, opt, *mix(x, y, model.config["num_classes"]), label_smoothing)
            train_loss = total.item() / len(train_loader)  # .item() waits for the device, so the clock is fair
            speed = len(train_loader) * train_loader.batch_size / (time.perf_counter() - t0)
            test_loss, test_acc = evaluate(fast, test_loader)
            for key, value in zip(history, (train_loss, test_loss, test_acc, lr * scale, speed)):
                history[key].append(value)
            left = (time.perf_counter() - t_start) / (epoch + 1 - start) * (epochs - epoch - 1)
            print(f"epoch {epoch + 1:3d}/{epochs}  train loss {train_loss:.3f}  test loss {test_loss:.3f}  "
                  f"test acc {test_acc:.1%}  {speed:4.0f} img/s  {left / 60:4.1f} min left", flush=True)
            if checkpoint:
                state = {"model": model.state_dict(), "config": model.config, "history": history,
                         "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
                write_whole(checkpoint, lambda f: torch.save(state, f))
    except KeyboardInterrupt:
        print(f"interrupted: {checkpoint} holds epoch {len(history['test_acc'])}, --resume goes on from there")
    return history

def step_speed(model, x, y, steps=10, compile=False):
    """Images/s of the bare training step, with no data loading: a copy of the model, one batch, again and again."""
    model = copy.deepcopy(model).train()
    fast, opt = torch.compile(model) if compile else model, torch.optim.AdamW(model.parameters())
    for _ in range(3):  # warm-up
        train_step(fast, opt, x, y, 0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step(fast, opt, x, y, 0.0)
    loss.item()  # waits for the device
    return steps * len(x) / (time.perf_counter() - t0)

# ---------------------------------------------------------------------------------------- plots
@torch.no_grad()
def attention_rollout(model, images):  # (b, c, s, s) normalised
    """Where the class token looks: attention rolled out through all layers (Abnar & Zuidema, 2020), heads
    averaged and the residual path counted as (A + I) / 2. Returns (b, s/p, s/p) maps that sum to 1."""
    model.eval()
    _, weights = model(images, return_weights=True)  # depth x (b, heads, n + 1, n + 1), the explicit path
    rollout = eye = torch.eye(weights[0].shape[-1], device=images.device)
    for w in weights:
        rollout = (w.float().mean(dim=1) + eye) / 2 @ rollout  # (b, n + 1, n + 1)
    cls = rollout[:, 0, 1:]  # (b, n): the class token's row, over the patches
    side = images.shape[-1] // model.config["patch_size"]
    return (cls / cls.sum(-1, keepdim=True)).view(-1, side, side)

def save_figure(fig, path):
    write_whole(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)

def plot_patches(image, patch_size, path):  # uint8 (3, s, s)
    patches = rearrange(image, "c (h p1) (w p2) -> h w c p1 p2", p1=patch_size, p2=patch_size)
    grid = rearrange(F.pad(patches, (1, 1, 1, 1), value=255), "h w c p1 p2 -> (h p1) (w p2) c")  # white gaps
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    axes[0].imshow(image.permute(1, 2, 0).numpy()), axes[0].set_title(f"image, {image.shape[-1]} px")
    axes[1].imshow(grid.numpy()), axes[1].set_title(f"{patches.shape[0] * patches.shape[1]} patches of {patch_size} px")
    [ax.axis("off") for ax in axes]
    save_figure(fig, path)

def plot_history(history, path):
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, history["train_loss"]), left.plot(epochs, history["test_loss"])
    left.set(xlabel="epoch", ylabel="cross-entropy loss"), left.legend(["train (augmented, mixed)", "test"])
    right.plot(epochs, history["test_acc"]), right.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    save_figure(fig, path)

def plot_attention(model, images, path):  # uint8 (k, 3, s, s)
    maps = attention_rollout(model, normalise(images.to(next(model.parameters()).device)))  # (k, s/p, s/p)
    maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear")[:, 0].cpu()  # (k, s, s)
    fig, axes = plt.subplots(2, len(images), figsize=(2.5 * len(images), 5), squeeze=False)
    for image, heat, top, bottom in zip(images, maps, *axes):
        top.imshow(image.permute(1, 2, 0).numpy()), bottom.imshow(image.permute(1, 2, 0).numpy())
        bottom.imshow(heat.numpy(), cmap="inferno", alpha=0.6), top.axis("off"), bottom.axis("off")
    fig.suptitle("class-token attention, rolled out over all layers")
    save_figure(fig, path)

# ----------------------------------------------------------------------------------- command line
def parse_args(argv):
    def positive(text):
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
        return int(text)
    p = argparse.ArgumentParser(description="Train a Vision Transformer on Oxford-IIIT Pet and plot what it learned.")
    p.add_argument("--data-dir", default="./data", help="where Oxford-IIIT Pet is, or is downloaded to")
    p.add_argument("--out-dir", default="./out", help="for vit.pt, patches.png, loss.png, attention.png")
    for name, default in [("epochs", 100), ("batch-size", 8), ("image-size", 96), ("patch-size", 8), ("dim", 128),
                          ("depth", 4), ("heads", 4), ("mlp-dim", 256)]:  # as accurate on pets3 as 192 wide, 6 deep
        p.add_argument(f"--{name}", type=positive, default=default)
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4, or 3e-5 with --pretrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "mps", "cpu"], help="default: cuda, then mps, then cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes decoding JPEGs")
    p.add_argument("--fake-data", action="store_true", help="random images instead of Pet: runs offline in seconds")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--pretrained", action="store_true", help="fine-tune torchvision's ImageNet ViT-B/16 at 224 px")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/vit.pt")
    args = p.parse_args(argv)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    for wrong, message in [(args.image_size % args.patch_size, f"--patch-size {args.patch_size} does not divide "
                            f"--image-size {args.image_size}"),
                           (args.dim % args.heads, f"--heads {args.heads} does not divide --dim {args.dim}"),
                           (args.lr is not None and not 0 < args.lr < 1, f"--lr must be in (0, 1), got {args.lr}"),
                           (args.workers < 0, f"--workers must be 0 or more, got {args.workers}"),
                           (args.device and not available[args.device], f"--device {args.device} is not available")]:
        if wrong:
            p.error(message)
    args.device = args.device or next(d for d, ok in available.items() if ok)
    return args

def main(argv=None):
    args = parse_args(argv)
    out, state, tv = Path(args.out_dir), None, None
    out.mkdir(parents=True, exist_ok=True)
    if args.resume:  # the model is the checkpoint's, whatever the options say
        if not (out / "vit.pt").exists():
            sys.exit(f"error: --resume found no checkpoint at {out / 'vit.pt'}")
        state = torch.load(out / "vit.pt", map_location=args.device, weights_only=True)
        args.image_size = state["config"]["image_size"]
    elif args.pretrained:
        try:
            tv = torchvision.models.vit_b_16(weights="IMAGENET1K_V1")
        except (OSError, RuntimeError) as e:
            sys.exit(f"error: could not download torchvision's ViT-B/16 ImageNet weights ({e}).\n"
                     "Connect to the internet once (torch caches them), or train from scratch without --pretrained.")
        args.image_size = tv.image_size
    try:
        train_data, test_data = (load_data(args.data_dir, split, args.image_size, args.workers, args.fake_data)
                                 for split in ("trainval", "test"))
    except (OSError, RuntimeError) as e:  # the last line: a worker's error comes with its traceback
        sys.exit(f"error: could not load Oxford-IIIT Pet from {args.data_dir} ({str(e).splitlines()[-1]}).\n"
                 "Download it there when online, point --data-dir at the folder that holds oxford-iiit-pet/images "
                 "and annotations, or run offline with --fake-data.")
    torch.manual_seed(args.seed)
    model = (ViT(**state["config"]) if state else from_torchvision(tv, PET_CLASSES) if tv else
             ViT(args.image_size, args.patch_size, PET_CLASSES, args.dim, args.depth, args.heads, args.mlp_dim)
             ).to(args.device)
    with FlopCounterMode(display=False) as flops, torch.no_grad():  # counted on the explicit attention path
        model(torch.zeros(1, 3, args.image_size, args.image_size, device=args.device), return_weights=True)
    print(f"ViT {model.config}\n{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{flops.get_total_flops() / 1e9:.3f} GFLOPs per image forward (a multiply-add is 2), on {args.device}")
    train_loader = Batches(*train_data, args.batch_size, args.device, train=True)
    test_loader = Batches(*test_data, args.batch_size, args.device)
    plot_patches(test_data[0][0], model.config["patch_size"], out / "patches.png")
    lr = args.lr or (3e-5 if args.pretrained else 3e-4)  # fine-tuning takes smaller steps
    history = train(model, train_loader, test_loader, args.epochs, lr, compile=args.compile, checkpoint=out / "vit.pt",
                    resume=state)
    plot_history(history, out / "loss.png")
    plot_attention(model, test_data[0][torch.linspace(0, len(test_data[0]) - 1, 4).long()], out / "attention.png")
    if len(history["test_acc"]) < args.epochs:
        sys.exit(130)  # interrupted, with the checkpoint and plots written: --resume goes on
    bare = step_speed(model, *next(iter(train_loader)), compile=args.compile)
    epoch = sorted(history["train_images_per_s"])[len(history["train_images_per_s"]) // 2]
    print(f"test accuracy {history['test_acc'][-1]:.1%}. Training: {epoch:.0f} img/s in the epochs (median), "
          f"{bare:.0f} img/s in the bare training step, {epoch / bare:.0%} of it. Wrote {out}/")

if __name__ == "__main__":
    main()
