"""A Vision Transformer (Dosovitskiy et al., 2020) trained from scratch on Oxford-IIIT Pet."""
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
import torchvision.transforms.v2 as T
from einops import rearrange
from PIL import Image
from torchvision.datasets import ImageFolder, OxfordIIITPet

# ------------------------------------------------------------------------------------ model
class PatchEmbedding(nn.Module):
    """Cut the image into p x p patches and project each to a token (as a stride-p convolution)."""
    def __init__(self, image_size, patch_size, channels, dim):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must be a positive divisor of {image_size}")
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
            raise ValueError(f"heads {heads} must be a positive divisor of dim {dim}")
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

def sincos_2d(side, dim):  # (side * side, dim): each patch's column and row as sines and cosines
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    frequencies = 10000 ** -torch.linspace(0, 1, dim // 4)  # from 1 to 1 / 10000
    x = columns.reshape(-1, 1) * frequencies  # (side * side, dim // 4)
    y = rows.reshape(-1, 1) * frequencies
    return F.pad(torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1), (0, dim % 4))

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
        # as timm's ViT: linear weights truncated normal (std 0.02), biases zero
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            # positions start as sines and cosines of each patch's column and row
            self.pos_embedding[0, 1:] = sincos_2d(image_size // patch_size, dim)
            # attention as training leaves it (mimetic init, Trockman and Kolter 2023): W_q^T W_k
            # near 0.7 I, so that tokens attend to similar and nearby ones; W_o W_v near -0.4 I
            qk, vo = 0.7**0.5 * torch.eye(dim), 0.4**0.5 * torch.eye(dim)
            for block in self.blocks:
                block.attn.qkv.weight += torch.cat([qk, qk, -vo])  # the q, k and v rows
                block.attn.proj.weight += vo
    def forward(self, images, return_weights=False):  # (b, c, h, w) float
        x = self.patch_embed(images)  # (b, n, dim)
        cls = self.cls_token.expand(len(x), -1, -1)  # (b, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (b, n + 1, dim)
        all_weights = []  # per block (b, heads, n + 1, n + 1), on the explicit path
        for block in self.blocks:
            x, weights = block(x, return_weights)
            all_weights.append(weights)
        logits = self.head(self.norm(x[:, 0]))  # (b, num_classes), from the class token
        return (logits, all_weights) if return_weights else logits

# ------------------------------------------------------------------------------------- data
WORKERS = min(8, os.cpu_count() or 1)  # processes that decode the images

def read_image(path):  # as RGB, or an error that names the file
    try:
        return Image.open(path).convert("RGB")
    except OSError:  # not an image, or a truncated one
        raise ValueError(f"{path} is not an image that PIL can read whole") from None

def image_folder(folder, transform):  # folder/<class>/<image>: every file but hidden ones
    dataset = ImageFolder(folder, transform, loader=read_image, allow_empty=True,
                          is_valid_file=lambda path: not Path(path).name.startswith("."))
    empty = set(range(len(dataset.classes))) - set(dataset.targets)  # labels without an image
    if empty:
        raise ValueError(f"{folder / dataset.classes[min(empty)]} holds no images")
    if len(dataset.classes) < 2:
        raise ValueError(f"{folder} holds one class folder: a classifier needs two or more")
    return dataset

def open_data(data_dir, image_size):
    """Train and test split, and class names: of data_dir/{train,test}/<class>/ or else of Pet."""
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    folders = [Path(data_dir) / "train", Path(data_dir) / "test"]
    if any(folder.exists() for folder in folders):
        splits = [image_folder(folder, transform) for folder in folders]
        if splits[0].classes != splits[1].classes:
            raise ValueError(f"{folders[0]} and {folders[1]} hold different class folders")
        return splits, splits[0].classes
    try:
        splits = [OxfordIIITPet(data_dir, split, transform=transform, download=True)
                  for split in ("trainval", "test")]
    except OSError as error:  # no network, most often
        raise OSError(f"Oxford-IIIT Pet could not be downloaded to {data_dir}/oxford-iiit-pet "
                      f"({error}): go online, put it there by hand, or use --data-dir with train/"
                      " and test/") from None
    # Pet's labels are its breed ids (0-36), also in a copy that holds only some breeds
    names = dict(zip(sorted(set(splits[0]._labels)), splits[0].classes))
    return splits, [names.get(label, f"class {label}") for label in range(37)]

def load_data(dataset, device="cpu"):  # decoded once, into memory
    print(f"decoding {len(dataset)} images")
    batches = list(torch.utils.data.DataLoader(dataset, 64, num_workers=WORKERS))
    images = torch.cat([batch_images for batch_images, batch_labels in batches])
    labels = torch.cat([batch_labels for batch_images, batch_labels in batches])
    return images.to(device), labels.to(device)  # uint8 (n, 3, s, s), (n,)

def normalise(images):  # uint8 (b, 3, s, s) -> float, with ImageNet's mean and std per channel
    return T.functional.normalize(images / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

def augment(images, min_scale=0.5, flip=True):  # (b, c, s, s) float
    """Crop each image (area min_scale..1, aspect 3/4..4/3) and mirror half: one resampling."""
    b = len(images)
    area = torch.empty(b).uniform_(min_scale, 1)
    aspect = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    # the crop's width and height as a fraction of the side, its centre in [-1, 1]
    w = (area * aspect).sqrt().clamp(max=1)
    h = (area / aspect).sqrt().clamp(max=1)
    cx = (torch.rand(b) * 2 - 1) * (1 - w)
    cy = (torch.rand(b) * 2 - 1) * (1 - h)
    mirror = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    # output to input coordinates: x_in = mirror * w * x_out + cx, y_in = h * y_out + cy
    theta = torch.stack([mirror * w, 0 * w, cx, 0 * h, h, cy], dim=1).view(b, 2, 3)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)

# --------------------------------------------------------------------------------- training
def train_step(model, optimizer, images, targets, label_smoothing):  # the model in train mode
    # bf16 matrix multiplies on CUDA, float32 everywhere else
    with torch.autocast("cuda", torch.bfloat16, enabled=images.is_cuda):
        loss = F.cross_entropy(model(images), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()

@torch.no_grad()
def evaluate(model, images, labels, batch_size=256):  # uint8 images -> mean loss, accuracy
    model.eval()
    logits = torch.cat([model(normalise(x)) for x in images.split(batch_size)])  # (n, classes)
    return F.cross_entropy(logits, labels).item(), logits.argmax(1).eq(labels).float().mean().item()

def lr_at(step, peak, warmup_steps, total_steps):  # a linear warm-up, then a cosine to zero
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2

def train(model, train_data, test_data, epochs, batch_size, lr=3e-4, weight_decay=0.05, warmup=5,
          label_smoothing=0.1, min_scale=0.5, flip=True, mix=True, path=None, keep=None,
          resume=None):
    """AdamW on augmented (and mixed) batches, lr warm-up then cosine; a test after each epoch."""
    # weights that multiply (matrices, kernels) decay; biases, norms, tokens, positions do not
    decay = [p for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0)]
    optimizer = torch.optim.AdamW(groups, lr)
    classes = model.config["num_classes"]
    # Mixup or CutMix, half the time each: images blended, or a box pasted in, targets alike
    mixes = T.RandomChoice([T.MixUp(alpha=0.8, num_classes=classes), T.CutMix(num_classes=classes)])
    mix_batch = mixes if mix else T.Identity()  # labels (b,) -> probabilities (b, classes)
    history = resume["history"] if resume else dict(train_loss=[], test_loss=[], test_acc=[])
    if resume:  # one value per epoch in history; the weights, moments and random numbers as left
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])  # every random number is drawn on the CPU
    images, labels = train_data  # uint8 (n, 3, s, s), (n,), on the model's device
    steps = max(len(images) // batch_size, 1)  # whole batches only, unless there is just one
    warmup_steps = int(min(warmup, epochs / 10) * steps)
    for epoch in range(len(history["train_loss"]), epochs):
        model.train()
        loss_sum = 0.0
        epoch_started = time.perf_counter()
        order = torch.randperm(len(images))[:steps * batch_size].to(images.device)
        for i, batch in enumerate(order.view(steps, -1)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + i, lr, warmup_steps, epochs * steps)
            inputs = augment(normalise(images[batch]), min_scale, flip)  # (b, 3, s, s)
            inputs, targets = mix_batch(inputs, labels[batch])
            loss_sum += train_step(model, optimizer, inputs, targets, label_smoothing)
        train_loss = loss_sum.item() / steps  # .item() waits for the device: a fair clock
        images_per_s = len(order) / (time.perf_counter() - epoch_started)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"the training loss is {train_loss} in epoch {epoch + 1}")
        test_loss, test_acc = evaluate(model, *test_data)
        for key, value in zip(history, (train_loss, test_loss, test_acc)):
            history[key].append(value)
        if path:  # all that resume needs, and keep, written whole: to a temporary name, renamed
            checkpoint = {"model": model.state_dict(), "config": model.config, "history": history,
                          "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
            torch.save(checkpoint | (keep or {}), f"{path}.tmp")
            os.replace(f"{path}.tmp", path)
        minutes_left = (time.perf_counter() - epoch_started) * (epochs - epoch - 1) / 60
        print(f"epoch {epoch + 1}/{epochs}  train loss {train_loss:.3f}  test loss {test_loss:.3f}"
              f"  test acc {test_acc:.1%}  {images_per_s:.0f} img/s  {minutes_left:.1f} min left")
    return history

# ------------------------------------------------------------------------------------ plots
def plot_patches(image, patch_size, path):  # uint8 (3, s, s): the patches the model reads
    patches = rearrange(image, "c (h p1) (w p2) -> h w c p1 p2", p1=patch_size, p2=patch_size)
    framed = F.pad(patches, (1, 1, 1, 1), value=255)  # a white frame around each patch
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.imshow(rearrange(framed, "h w c p1 p2 -> (h p1) (w p2) c").cpu().numpy())
    axis.set_title(f"{len(patches)**2} patches of {patch_size} x {patch_size} pixels")
    axis.axis("off")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)

def plot_history(history, path):
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history["train_loss"]) + 1)
    left.plot(epochs, history["train_loss"], epochs, history["test_loss"])
    left.set(xlabel="epoch", ylabel="cross-entropy loss")
    left.legend(["train (augmented, mixed)", "test"])
    right.plot(epochs, history["test_acc"])
    right.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)

@torch.no_grad()
def plot_attention(model, images, labels, classes, path):  # uint8 (k, 3, s, s), (k,)
    logits, weights = model(normalise(images), return_weights=True)
    side = images.shape[-1] // model.config["patch_size"]
    maps = weights[-1].mean(dim=1)[:, 0, 1:].reshape(-1, 1, side, side)  # (k, 1, s/p, s/p)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear")  # (k, 1, s, s)
    figure, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 3), squeeze=False)
    for i, (label, guess) in enumerate(zip(labels.tolist(), logits.argmax(-1).tolist())):
        axes[0, i].set_title(f"{classes[label]}\npredicted {classes[guess]}", fontsize=9,
                             color="green" if guess == label else "red")
        axes[0, i].imshow(images[i].permute(1, 2, 0).cpu().numpy())
        axes[0, i].imshow(maps[i, 0].cpu().numpy(), cmap="inferno", alpha=0.5)
        axes[0, i].axis("off")
    figure.suptitle("the class token's attention to each patch in the last block, heads averaged")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)

# ----------------------------------------------------------------------------- command line
def main(argv=None):
    parser = argparse.ArgumentParser(  # no usage block: an error is one line
        description=__doc__.splitlines()[0], usage=argparse.SUPPRESS, allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=os.path.abspath, default="data", help="holds the images")
    parser.add_argument("--out-dir", default="out", help="where vit.pt and the plots go")
    parser.add_argument("--epochs", type=int, default=220, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--image-size", type=int, default=96, help="pixels a side")
    parser.add_argument("--patch-size", type=int, default=12, help="pixels a patch side")
    parser.add_argument("--dim", type=int, default=128, help="width of a token")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--mlp-dim", type=int, default=256, help="hidden width of each MLP")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="for the weights and the batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resume", action="store_true", help="go on with the run in --out-dir")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    given = {word.split("=")[0][2:].replace("-", "_") for word in argv if word.startswith("--")}
    if args.resume and given - {"resume", "out_dir", "data_dir", "device"}:
        parser.error("--resume keeps the run's options: only --out-dir, --data-dir, --device go")
    if min(args.epochs, args.batch_size) < 1 or args.lr <= 0:
        parser.error("--epochs, --batch-size and --lr must be positive")
    path = Path(args.out_dir) / "vit.pt"
    checkpoint = None
    if args.resume:  # the run's own options, but for where things are
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            renewed = {name: getattr(args, name) for name in given | {"out_dir", "device"}}
            args = argparse.Namespace(**(checkpoint["options"] | renewed))
        except Exception as error:
            sys.exit(f"error: --resume cannot read a checkpoint at {path} ({type(error).__name__})")
    elif path.exists():
        sys.exit(f"error: {path} holds a run: go on with --resume, or use another --out-dir")
    try:  # what goes wrong here ends in a one-line message
        (train_set, test_set), classes = open_data(args.data_dir, args.image_size)
        if checkpoint and checkpoint.get("classes") != classes:
            raise ValueError(f"{args.data_dir} holds other classes than the run in {path}")
        torch.manual_seed(args.seed)
        model = ViT(args.image_size, args.patch_size, len(classes), args.dim, args.depth,
                    args.heads, args.mlp_dim).to(args.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        train_data = load_data(train_set, args.device)
        images, labels = load_data(test_set, args.device)  # the test split: scored and drawn
        history = train(model, train_data, (images, labels), args.epochs, args.batch_size,
                        args.lr, path=path, keep=dict(options=vars(args), classes=classes),
                        resume=checkpoint)
        plot_patches(images[0], args.patch_size, path.with_name("patches.png"))
        plot_history(history, path.with_name("loss.png"))
        shown = torch.linspace(0, len(images) - 1, 4).long()
        plot_attention(model, images[shown], labels[shown], classes, path.parent / "attention.png")
        tested = [classes[label] for label in labels.unique().tolist()]  # the test split's classes
        names = ", ".join(tested) if len(tested) < 5 else f"{tested[0]}, ..., {tested[-1]}"
        print(f"test accuracy {history['test_acc'][-1]:.1%} on {len(tested)} classes ({names}), "
              f"plots and vit.pt in {path.parent}")
    except KeyboardInterrupt:  # vit.pt, if there, holds the last epoch saved whole
        kept = f"{path} keeps the last whole epoch, --resume goes on"
        print(f"\ninterrupted: {kept if path.exists() else 'nothing saved'}", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError, ValueError, FloatingPointError, AssertionError) as error:
        lines = str(error).strip().splitlines() or [repr(error)]  # a worker's error: a traceback
        sys.exit(f"error: {lines[-1] if 'Traceback' in str(error) else lines[0]}")

if __name__ == "__main__":
    main()
