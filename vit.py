"""A Vision Transformer (Dosovitskiy et al., 2020) trained from scratch on Oxford-IIIT Pet.
Top to bottom: the model, the data, training, plots and the command line (python vit.py --help)."""
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
from torchvision.datasets import FakeData, OxfordIIITPet

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
    """Our ViT with a torchvision VisionTransformer's weights; another num_classes: a new head."""
    if not isinstance(getattr(tv, "conv_proj", None), nn.Conv2d) or tv.representation_size:
        raise ValueError("from_torchvision takes a ViT with a patch convolution and a linear head")
    num_classes = tv.num_classes if num_classes is None else num_classes
    model = ViT(tv.image_size, tv.patch_size, num_classes, tv.hidden_dim, len(tv.encoder.layers),
                tv.encoder.layers[0].num_heads, tv.mlp_dim)
    theirs = tv.state_dict()
    for name, param in model.state_dict().items():
        their_name = name
        for our_part, their_part in RENAMES:
            their_name = their_name.replace(our_part, their_part)
        weight = theirs[their_name]
        if name == "patch_embed.proj.weight":  # the conv's (dim, c, p, p) is our (dim, c * p * p)
            weight = weight.flatten(1)
        if name.startswith("head.") and num_classes != tv.num_classes:
            weight = torch.zeros_like(param)  # a new head, for fine-tuning, starts at zero
        if weight.shape != param.shape:
            raise ValueError(f"torchvision's {their_name} is {tuple(weight.shape)}, our {name} "
                             f"{tuple(param.shape)}")
        param.copy_(weight)
    return model

# ------------------------------------------------------------------------------------- data
PET_CLASSES = 37  # breeds in Oxford-IIIT Pet
WORKERS = min(8, os.cpu_count() or 1)  # processes that decode the JPEGs

def load_data(data_dir, split, image_size, device="cpu", fake=False):
    """Pet's "trainval" or "test" split (downloaded if missing) or random images, decoded once."""
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    if fake:  # random images, other ones for the test split
        dataset = FakeData(256, (3, image_size, image_size), PET_CLASSES, transform,
                           random_offset=256 if split == "test" else 0)
    else:
        dataset = OxfordIIITPet(data_dir, split, transform=transform, download=True)
    images, labels = [], []
    for batch_images, batch_labels in torch.utils.data.DataLoader(dataset, 64, num_workers=WORKERS):
        images.append(batch_images)
        labels.append(batch_labels)
        print(f"\rdecoding {split}: {sum(map(len, labels))}/{len(dataset)}", end="", flush=True)
    print()
    return torch.cat(images).to(device), torch.cat(labels).to(device)  # uint8 (n, 3, s, s), (n,)

def normalise(images):  # uint8 (b, 3, s, s) -> float, with ImageNet's mean and std per channel
    scaled = images.float() / 255
    return T.functional.normalize(scaled, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

def augment(images, min_scale=0.25, flip=True):  # (b, c, s, s) float
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
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item(), accuracy

def lr_at(step, peak, warmup_steps, total_steps):  # a linear warm-up, then a cosine to zero
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2

def train(model, train_data, test_data, epochs, batch_size, lr=3e-4, weight_decay=0.05, warmup=5,
          label_smoothing=0.1, min_scale=0.25, flip=True, mix=True, path=None, options=None,
          resume=None):
    """AdamW on augmented (and mixed) batches, lr warm-up then cosine; a test after each epoch."""
    # weight matrices decay; biases, norms, the class token and the positions do not
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0)]
    optimizer = torch.optim.AdamW(groups, lr)
    classes = model.config["num_classes"]
    # Mixup or CutMix, half the time each: images blended, or a box pasted in, targets alike
    mixes = T.RandomChoice([T.MixUp(alpha=0.8, num_classes=classes), T.CutMix(num_classes=classes)])
    mix_batch = mixes if mix else T.Identity()  # labels (b,) -> probabilities (b, classes)
    history = dict(train_loss=[], test_loss=[], test_acc=[])  # one value per epoch
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history = resume["history"]
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
        history["train_loss"].append(train_loss)
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
        if path:  # all that resume needs, written whole: to a temporary name, then renamed
            checkpoint = {"model": model.state_dict(), "config": model.config, "options": options,
                          "history": history, "optimizer": optimizer.state_dict(),
                          "rng": torch.get_rng_state()}
            torch.save(checkpoint, f"{path}.tmp")
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
    left.plot(epochs, history["train_loss"], label="train (augmented, mixed)")
    left.plot(epochs, history["test_loss"], label="test")
    left.set(xlabel="epoch", ylabel="cross-entropy loss")
    left.legend()
    right.plot(epochs, history["test_acc"])
    right.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)

@torch.no_grad()
def plot_attention(model, images, labels, path):  # uint8 (k, 3, s, s), (k,)
    logits, weights = model(normalise(images), return_weights=True)
    side = images.shape[-1] // model.config["patch_size"]
    maps = weights[-1].mean(dim=1)[:, 0, 1:].reshape(-1, 1, side, side)  # (k, 1, s/p, s/p)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear")  # (k, 1, s, s)
    figure, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 3), squeeze=False)
    for i, (label, guess) in enumerate(zip(labels.tolist(), logits.argmax(-1).tolist())):
        color = "green" if guess == label else "red"
        axes[0, i].set_title(f"class {label}, predicted {guess}", color=color, fontsize=9)
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
    parser.add_argument("--data-dir", type=os.path.abspath, default="data", help="holds Pet")
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
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu", help="cpu, cuda, mps ...")
    parser.add_argument("--fake-data", action="store_true", help="random images, to try it")
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
        torch.manual_seed(args.seed)
        model = ViT(args.image_size, args.patch_size, PET_CLASSES, args.dim, args.depth, args.heads,
                    args.mlp_dim).to(args.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        train_data = load_data(args.data_dir, "trainval", args.image_size, args.device,
                               args.fake_data)
        images, labels = load_data(args.data_dir, "test", args.image_size, args.device,
                                   args.fake_data)  # the test split: scored and drawn
        print(f"ViT {model.config}, {sum(p.numel() for p in model.parameters()):,} parameters")
        history = train(model, train_data, (images, labels), args.epochs, args.batch_size,
                        args.lr, path=path, options=vars(args), resume=checkpoint)
        plot_patches(images[0], args.patch_size, path.with_name("patches.png"))
        plot_history(history, path.with_name("loss.png"))
        shown = torch.linspace(0, len(images) - 1, 4).long()
        plot_attention(model, images[shown], labels[shown], path.with_name("attention.png"))
        print(f"test accuracy {history['test_acc'][-1]:.1%}, plots and vit.pt in {path.parent}")
    except KeyboardInterrupt:
        kept = "no checkpoint written"
        if path.exists():  # read back: vit.pt holds the last epoch saved whole
            done = len(torch.load(path, weights_only=True)["history"]["train_loss"])
            kept = f"{path} keeps {done} of {args.epochs} epochs, --resume goes on"
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError, ValueError, FloatingPointError, AssertionError) as error:
        lines = str(error).strip().splitlines() or [repr(error)]  # a worker's error: a traceback
        sys.exit(f"error: {lines[-1] if 'Traceback' in str(error) else lines[0]}")

if __name__ == "__main__":
    main()
