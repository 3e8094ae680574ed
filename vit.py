"""A Vision Transformer (Dosovitskiy et al., 2020) trained from scratch on Pet or your images."""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from einops import rearrange
from matplotlib.figure import Figure
from PIL import Image, ImageOps
from torchvision.datasets import OxfordIIITPet
from torchvision.datasets.folder import IMG_EXTENSIONS

# the default model: 96 x 96 images in 12 x 12 patches, tokens 128 wide, 4 blocks of 4 heads
MODEL = dict(image_size=96, patch_size=12, dim=128, depth=4, heads=4, mlp_dim=256)

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
        self.keep_weights = False  # True: the math written out, the weights kept in .weights
    def forward(self, x):  # (b, n, dim)
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
        if self.keep_weights:  # how much each token takes from each other, kept to be looked at
            self.weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            out = self.weights @ v  # (b, h, n, d), from weights (b, h, n, n)
        else:  # the same numbers from one fused kernel, which stores no weights
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (b, n, dim)

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
    def forward(self, x):  # (b, n, dim)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

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
        # a learned position for the class token (from 0) and each patch (from its column, row)
        positions = torch.cat([torch.zeros(1, dim), sincos_2d(image_size // patch_size, dim)])
        self.pos_embedding = nn.Parameter(positions.unsqueeze(0))  # (1, n + 1, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init_weights)
    @torch.no_grad()
    def _init_weights(self, module):  # called on every module, each after the modules in it
        if isinstance(module, nn.Linear):  # as timm's ViT: truncated normal, std 0.02; biases 0
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        if isinstance(module, Attention):
            # attention as training leaves it (mimetic init, Trockman and Kolter 2023): W_q^T W_k
            # near 0.7 I, so that tokens attend to similar and nearby ones; W_o W_v near -0.4 I
            eye = torch.eye(module.proj.in_features)
            module.qkv.weight += torch.cat([0.7**0.5 * eye, 0.7**0.5 * eye, -(0.4**0.5) * eye])
            module.proj.weight += 0.4**0.5 * eye
    def forward(self, images):  # (b, c, h, w) floats
        x = self.patch_embed(images)  # (b, n, dim)
        cls = self.cls_token.expand(len(x), -1, -1)  # (b, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (b, n + 1, dim)
        x = self.blocks(x)  # (b, n + 1, dim)
        return self.head(self.norm(x[:, 0]))  # (b, num_classes), from the class token

class UserError(ValueError):
    """A file, folder or option that cannot be used, said in one line; a bug keeps its traceback."""

def read_image(path):  # as a person sees it, upright, in RGB; or an error that names the file
    try:
        return ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # phones store it turned
    except (OSError, Image.DecompressionBombError) as error:  # not an image, half one, too large
        raise UserError(f"cannot read {path} as an image: {error}") from None

def load_images(paths, image_size):  # uint8 (n, 3, s, s): resized, centre-cropped, in memory
    resize = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    return torch.stack([resize(read_image(path)) for path in paths])

def find_images(folder):  # (image files, labels) of folder/<class>/ and its subfolders; classes
    def hidden(path):  # a dot file, or one inside a dot folder
        return any(part.startswith(".") for part in path.relative_to(folder).parts)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not hidden(d))
    if len(classes) < 2:
        raise UserError(f"{folder} needs two or more class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = [f for f in sorted((folder / name).rglob("*")) if not hidden(f) and f.is_file()]
        images = [f for f in found if f.suffix.lower() in IMG_EXTENSIONS]
        if not images:
            raise UserError(f"{folder / name} holds no images")
        files += images
        labels += [label] * len(images)
    return (files, torch.tensor(labels)), classes

def open_data(data_dir):
    """(image files, labels) of a train and a test split, and the class names, from data_dir's
    train/ and test/ (or val/) class folders, or from Pet, downloaded if data_dir is empty."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir} is not a folder")
    names = {entry.name for entry in data_dir.iterdir() if not entry.name.startswith(".")}
    if names <= {"oxford-iiit-pet"}:  # Pet, or nothing yet: Pet goes here
        return open_pet(data_dir)
    test_name = "test" if "test" in names else "val"
    if "train" not in names or test_name not in names:
        raise UserError(f"{data_dir} holds no train/ and test/ (or val/): put each class's "
                        "images in train/<class>/ and test/<class>/, or empty it for Pet")
    train, classes = find_images(data_dir / "train")
    test, test_classes = find_images(data_dir / test_name)
    if classes != test_classes:
        only_one = sorted(set(classes) ^ set(test_classes))  # folders that one of them lacks
        raise UserError(f"{data_dir}: only one of train/ and {test_name}/ holds {only_one}")
    return train, test, classes

def open_pet(data_dir):  # Oxford-IIIT Pet's trainval and test splits, downloaded if need be
    try:
        pet = [OxfordIIITPet(data_dir, split, download=True) for split in ("trainval", "test")]
    except (OSError, ValueError) as error:  # no network, most often, or a broken copy
        raise UserError(f"Oxford-IIIT Pet could not be downloaded to {data_dir} ({error}): go "
                        "online, or use --data-dir with folders of your own images") from None
    # torchvision keeps the files and breed ids (0-36) in attributes it does not document
    names = dict(zip(sorted(set(pet[0]._labels)), pet[0].classes))  # a copy may lack breeds
    classes = [names.get(breed, f"class {breed}") for breed in range(37)]
    train, test = [(split._images, torch.tensor(split._labels)) for split in pet]
    return train, test, classes

def normalise(images):  # uint8 (b, 3, s, s) -> float, with ImageNet's mean and std per channel
    return T.functional.normalize(images / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

@torch.no_grad()
def evaluate(model, images, labels, batch_size=64):  # uint8 images -> mean loss, accuracy
    model.eval()
    logits = torch.cat([model(normalise(x)) for x in images.split(batch_size)])  # (n, classes)
    return F.cross_entropy(logits, labels).item(), logits.argmax(1).eq(labels).float().mean().item()

def lr_at(step, peak, warmup_steps, total_steps):  # a linear warm-up, then a cosine to zero
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps  # from above 0: the first step learns too
    return peak * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2

def train(model, train_data, test_data, *, epochs=220, batch_size=8,
          lr=3e-4, warmup=5, weight_decay=0.05,  # AdamW: the peak lr after warmup epochs
          label_smoothing=0.1, clip_norm=1.0,  # targets smoothed; gradients cut to this norm
          min_scale=0.5, flip=True,  # crops of min_scale..1 of the area, half of them mirrored
          mix=True, mixup_alpha=0.8, cutmix_share=0.5,  # Mixup, or CutMix on a share of batches
          resume_from=None, after_epoch=None):
    """AdamW on augmented, mixed batches; lr warm-up, then cosine; a test after every epoch.
    Takes uint8 images (n, 3, s, s) and labels (n,) on the model's device. after_epoch(state)
    gets all that the run needs to go on, and resume_from=state goes on from there."""
    images, labels = train_data
    # weight matrices decay; biases, norms, the class token and the positions do not
    decay = [p for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1]
    no_decay = [p for p in model.parameters() if not any(p is q for q in decay)]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0)]
    optimizer = torch.optim.AdamW(groups, lr)
    # each image: a crop of min_scale..1 of its area (aspect 3/4..4/3), resized back, mirrored
    # half the time; each batch: images blended (Mixup) or a box pasted in (CutMix), and their
    # labels (b,) alike, as class probabilities (b, classes)
    augment = T.Compose([T.RandomResizedCrop(images.shape[-1], scale=(min_scale, 1)),
                         T.RandomHorizontalFlip(0.5 if flip else 0)])
    classes = model.config["num_classes"]
    mixes = [T.MixUp(alpha=mixup_alpha, num_classes=classes), T.CutMix(num_classes=classes)]
    mix_batch = T.RandomChoice(mixes, p=[1 - cutmix_share, cutmix_share]) if mix else T.Identity()
    history = dict(train_loss=[], test_loss=[], test_acc=[])
    if resume_from:  # the weights, moments, history and random numbers as they were left
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        torch.set_rng_state(resume_from["rng"])  # every random number is drawn on the CPU
        history = resume_from["history"]
    steps = max(len(images) // batch_size, 1)  # whole batches only, unless there is just one
    warmup_steps = int(min(warmup, epochs / 10) * steps)
    for epoch in range(len(history["train_loss"]), epochs):
        model.train()
        loss_sum = 0.0
        order = torch.randperm(len(images))[:steps * batch_size].to(images.device)
        for i, batch in enumerate(order.view(steps, -1)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + i, lr, warmup_steps, epochs * steps)
            inputs = normalise(torch.stack([augment(image) for image in images[batch]]))
            inputs, targets = mix_batch(inputs, labels[batch])
            with torch.autocast("cuda", torch.bfloat16, enabled=inputs.is_cuda):  # bf16 on CUDA
                loss = F.cross_entropy(model(inputs), targets, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            loss_sum += loss.detach()
        # the epoch's mean loss, then a test
        train_loss = loss_sum.item() / steps
        test_loss, test_acc = evaluate(model, *test_data)
        for key, value in zip(history, (train_loss, test_loss, test_acc)):
            history[key].append(value)
        if after_epoch:
            after_epoch(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                             rng=torch.get_rng_state(), history=history))
        print(f"epoch {epoch + 1}/{epochs}  train loss {train_loss:.3f}  test loss {test_loss:.3f}"
              f"  test acc {test_acc:.1%}")
    return history

def plot_patches(image, patch_size, path):  # uint8 (3, s, s): the patches the model reads
    patches = rearrange(image, "c (h p1) (w p2) -> h w c p1 p2", p1=patch_size, p2=patch_size)
    framed = F.pad(patches, (1, 1, 1, 1), value=255)  # a white frame around each patch
    axis = Figure(figsize=(5, 5)).subplots()
    axis.imshow(rearrange(framed, "h w c p1 p2 -> (h p1) (w p2) c").cpu().numpy())
    axis.set_title(f"{len(patches)**2} patches of {patch_size} x {patch_size} pixels")
    axis.axis("off")
    axis.figure.savefig(path, dpi=100, bbox_inches="tight")

def plot_history(history, path):
    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    epochs = range(1, len(history["train_loss"]) + 1)
    left.plot(epochs, history["train_loss"], epochs, history["test_loss"])
    left.set(xlabel="epoch", ylabel="cross-entropy loss")
    left.legend(["train (augmented, mixed)", "test"])
    right.plot(epochs, history["test_acc"])
    right.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    figure.savefig(path, dpi=100, bbox_inches="tight")

@torch.no_grad()
def plot_attention(model, images, labels, classes, path):  # uint8 (k, 3, s, s), (k,)
    attention = model.blocks[-1].attn  # what the class token gathers last, for the head
    attention.keep_weights = True
    guesses = model.eval()(normalise(images)).argmax(dim=-1)
    attention.keep_weights = False
    side = images.shape[-1] // model.config["patch_size"]
    # the class token's weights on the patches, heads averaged: (k, 1, s/p, s/p), then (k, 1, s, s)
    maps = attention.weights.mean(dim=1)[:, 0, 1:].reshape(-1, 1, side, side)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear")
    figure = Figure(figsize=(2.6 * len(images), 3))
    for i, axis in enumerate(figure.subplots(1, len(images), squeeze=False)[0]):
        axis.set_title(f"{classes[labels[i]]}\npredicted {classes[guesses[i]]}", fontsize=9)
        axis.imshow(images[i].permute(1, 2, 0).cpu().numpy())
        axis.imshow(maps[i, 0].cpu().numpy(), cmap="inferno", alpha=0.5)
        axis.axis("off")
    figure.suptitle("the class token's attention to each patch in the last block, heads averaged")
    figure.savefig(path, dpi=100, bbox_inches="tight")

def save(checkpoint, path):  # whole or not at all: to a temporary file, then renamed
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)

def run(args, path, checkpoint=None):  # train and draw, from scratch or from the checkpoint
    if path.exists() and not checkpoint:
        raise UserError(f"{path} holds a run: go on with --resume, or use another --out-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    # claimed at once (a file made only if none is there): of two runs started here, one stops
    path.touch(exist_ok=bool(checkpoint))
    try:
        if args.data_dir == os.path.abspath("data"):  # the default folder, where Pet goes
            os.makedirs(args.data_dir, exist_ok=True)
        train_set, test_set, classes = open_data(args.data_dir)
        torch.manual_seed(args.seed)
        model = ViT(num_classes=len(classes), **MODEL).to(args.device)
        print(f"decoding {len(train_set[0])} training and {len(test_set[0])} test images")
        train_data, test_data = [
            (load_images(files, MODEL["image_size"]).to(args.device), labels.to(args.device))
            for files, labels in (train_set, test_set)]
        keep = dict(config=model.config, options=vars(args), classes=classes)
        history = train(model, train_data, test_data, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, resume_from=checkpoint,
                        after_epoch=lambda state: save(state | keep, path))
    except BaseException:  # stopped before its first epoch was saved: the claim is withdrawn
        if path.stat().st_size == 0:
            path.unlink()
        raise
    images, labels = test_data
    plot_patches(images[0], MODEL["patch_size"], path.with_name("patches.png"))
    plot_history(history, path.with_name("loss.png"))
    shown = torch.linspace(0, len(images) - 1, 4).long()  # four test images, first to last
    plot_attention(model, images[shown], labels[shown], classes, path.with_name("attention.png"))
    print(f"test accuracy {history['test_acc'][-1]:.1%}, plots and vit.pt in {path.parent}")

def main(argv=None):
    parser = argparse.ArgumentParser(  # no usage block: an error is one line
        description=__doc__.splitlines()[0], usage=argparse.SUPPRESS, allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", type=os.path.abspath, default="data", help="train/ and test/ (or val/) of "
        "class folders, or Pet, downloaded into the default folder or an empty one")
    add("--out-dir", default="out", help="where vit.pt and the plots go")
    add("--epochs", type=int, default=220, help="passes over the training set")
    add("--batch-size", type=int, default=8, help="images per step")
    add("--lr", type=float, default=3e-4, help="peak learning rate")
    add("--seed", type=int, default=0, help="for the weights and the batches")
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    add("--device", choices=devices, default=devices[-1], help="where to train")
    add("--resume", action="store_true", help="go on with the run in --out-dir")
    args = parser.parse_args(argv)
    if min(args.epochs, args.batch_size) < 1 or not 0 < args.lr < math.inf:
        parser.error("--epochs and --batch-size must be whole numbers above 0, --lr above 0")
    path = Path(args.out_dir) / "vit.pt"
    try:  # what a user can cause ends in one line; a bug keeps its traceback
        if not args.resume:
            return run(args, path)
        if path.stat().st_size == 0:  # claimed by a run that is starting, or was killed
            raise UserError(f"{path} holds no epoch yet: delete it if no run is starting there")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        # the run's options but where it is now; argparse fills in only what a namespace lacks:
        # what is typed (--data-dir, say, if the images moved), the out-dir, this machine's device
        saved = {name: value for name, value in checkpoint["options"].items()
                 if name not in ("out_dir", "device")}
        return run(parser.parse_args(argv, argparse.Namespace(**saved)), path, checkpoint)
    except KeyboardInterrupt:  # vit.pt, if there, holds the last epoch saved whole
        kept = f"{path} keeps the last whole epoch, --resume goes on"
        print(f"\ninterrupted: {kept if path.exists() else 'nothing saved'}", file=sys.stderr)
        sys.exit(130)
    except (OSError, UserError) as error:  # files, folders, network
        sys.exit(f"error: {error}")

if __name__ == "__main__":
    main()
