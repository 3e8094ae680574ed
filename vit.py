"""A Vision Transformer (Dosovitskiy et al., 2020) trained from scratch on Pet or your images."""
import argparse
import io
import math
import os
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from einops import rearrange
from PIL import Image, ImageOps
from torchvision.datasets import OxfordIIITPet
from torchvision.datasets.folder import IMG_EXTENSIONS

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
        self.keep_weights = False  # True: the math written out, the weights kept in .weights
        self.weights = None  # (b, heads, n, n) of the last pass with keep_weights
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
        # a learned position for each patch and one for the class token
        self.pos_embedding = nn.Parameter(torch.zeros(1, (image_size // patch_size)**2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
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
    def forward(self, images):  # (b, c, h, w) floats
        c, s = self.config["channels"], self.config["image_size"]
        if images.dtype != self.pos_embedding.dtype or images.shape[1:] != (c, s, s):
            raise ValueError(f"ViT takes {self.pos_embedding.dtype} images of shape (b, {c}, {s}, "
                             f"{s}), not {images.dtype} of shape {tuple(images.shape)}")
        x = self.patch_embed(images)  # (b, n, dim)
        cls = self.cls_token.expand(len(x), -1, -1)  # (b, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (b, n + 1, dim)
        x = self.blocks(x)  # (b, n + 1, dim)
        return self.head(self.norm(x[:, 0]))  # (b, num_classes), from the class token

# ------------------------------------------------------------------------------------- data
class UserError(ValueError):
    """A file, folder or option that cannot be used, said in one line; a bug keeps its traceback."""

def read_image(path):  # as a person sees it, in RGB; or an error that names the file
    try:
        image = ImageOps.exif_transpose(Image.open(path))  # phones store photos turned
        if image.mode.startswith("I"):  # 16 bits a pixel: keep the top 8
            image = image.point(lambda value: value / 256).convert("L")
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # onto white
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"),
                                          image.convert("RGBA"))
        return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:  # not an image, half one, too large
        raise UserError(f"cannot read {path} as an image: {error}") from None

def load_images(paths, image_size):  # uint8 (n, 3, s, s): resized, centre-cropped, in memory
    resize = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    return torch.stack([resize(read_image(path)) for path in paths])

def find_images(folder):  # {class: its image files} of folder/<class>/; hidden files skipped
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name[0] != ".")
    if len(classes) < 2:
        raise UserError(f"{folder} needs two or more class folders, not {len(classes)}")
    found, others = {}, []
    for name in classes:
        files = sorted(f for f in (folder / name).iterdir() if f.is_file() and f.name[0] != ".")
        found[name] = [f for f in files if f.suffix.lower() in IMG_EXTENSIONS]
        others += [f.name for f in files if f.suffix.lower() not in IMG_EXTENSIONS]
        if not found[name]:
            raise UserError(f"{folder / name} holds no images")
    if others:
        print(f"skipped {len(others)} files in {folder} that are not images, such as {others[0]}")
    return found

def numbered(split):  # {class: files} -> (files, labels), the classes numbered in order
    labels = [label for label, files in enumerate(split.values()) for _ in files]
    return [file for files in split.values() for file in files], torch.tensor(labels)

def open_data(data_dir, seed=0):
    """(image files, labels) of a train and a test split, and the class names, of data_dir's
    train/<class>/ and test/<class>/, or of its <class>/ alone (a fifth held out), or of Pet."""
    data_dir = Path(data_dir)
    if (data_dir / "train").exists() or (data_dir / "test").exists():
        train, test = find_images(data_dir / "train"), find_images(data_dir / "test")
        if train.keys() != test.keys():
            only_train = " ".join(f"train/{name}" for name in sorted(train.keys() - test.keys()))
            only_test = " ".join(f"test/{name}" for name in sorted(test.keys() - train.keys()))
            raise UserError(f"{data_dir} holds different class folders: "
                            f"{only_train or 'none'} against {only_test or 'none'}")
        return numbered(train), numbered(test), list(train)
    if [entry for entry in data_dir.glob("[!.]*") if entry.name != "oxford-iiit-pet"]:
        generator = torch.Generator().manual_seed(seed)
        train, test = {}, {}
        for name, files in find_images(data_dir).items():  # a fifth of each class held out
            if len(files) < 2:
                raise UserError(f"{data_dir / name} holds one image: it cannot be both trained on "
                                "and tested")
            shuffled = [files[i] for i in torch.randperm(len(files), generator=generator)]
            held_out = max(1, round(len(files) / 5))
            train[name], test[name] = shuffled[held_out:], shuffled[:held_out]
        print(f"{data_dir} holds no train/ and test/: {sum(map(len, test.values()))} of its "
              "images, a fifth of each class drawn by --seed, are held out to test")
        return numbered(train), numbered(test), list(train)
    try:
        pet = [OxfordIIITPet(data_dir, split, download=True) for split in ("trainval", "test")]
    except (OSError, ValueError) as error:  # no network, most often, or a broken copy
        raise UserError(f"Oxford-IIIT Pet could not be read from or downloaded to {data_dir}/"
                        f"oxford-iiit-pet ({error}): go online, put it there by hand, or use "
                        "--data-dir with folders of your own images") from None
    # Pet's labels are its breed ids (0-36), also in a copy that holds only some breeds
    names = dict(zip(sorted(set(pet[0]._labels)), pet[0].classes))
    classes = [names.get(breed, f"class {breed}") for breed in range(37)]
    train, test = [(split._images, torch.tensor(split._labels)) for split in pet]
    return train, test, classes

def normalise(images):  # uint8 (b, 3, s, s) -> float, with ImageNet's mean and std per channel
    return T.functional.normalize(images / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

# --------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model, images, labels, batch_size=64):  # uint8 images -> mean loss, accuracy
    model.eval()
    logits = torch.cat([model(normalise(x)) for x in images.split(batch_size)])  # (n, classes)
    return F.cross_entropy(logits, labels).item(), logits.argmax(1).eq(labels).float().mean().item()

def lr_at(step, peak, warmup_steps, total_steps):  # a linear warm-up, then a cosine to zero
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2

def save(checkpoint, path):  # whole or not at all: to a temporary file, then renamed
    buffer = io.BytesIO()  # serialised first, so that a full disk gives the system's error
    torch.save(checkpoint, buffer)
    try:
        Path(f"{path}.tmp").write_bytes(buffer.getbuffer())
        os.replace(f"{path}.tmp", path)
    except OSError as error:
        Path(f"{path}.tmp").unlink(missing_ok=True)
        raise OSError(f"{path} could not be saved: {error.strerror or error}") from None

def train(model, train_data, test_data, *, epochs=220, batch_size=8,
          lr=3e-4, warmup=5, weight_decay=0.1,  # AdamW: the peak lr after warmup epochs
          label_smoothing=0.1, clip_norm=1.0,  # targets smoothed; gradients cut to this norm
          min_scale=0.5, flip=True,  # crops of min_scale..1 of the area, half of them mirrored
          trivial_augment=True,  # and on each image one of TrivialAugment's ops, e.g. contrast
          mix=True, mixup_alpha=0.8, cutmix_share=0.5,  # Mixup, or CutMix on a share of batches
          path=None, keep=None, resume=None):
    """AdamW on augmented, mixed batches, lr warm-up then cosine; a test after every epoch.
    Images are uint8 (n, 3, s, s), labels (n,), on the model's device. Each epoch is saved to
    path (a vit.pt) with keep's items, and resume, such a checkpoint, goes on where it ends."""
    images, labels = train_data
    for name, data in dict(train_data=train_data, test_data=test_data).items():
        if data[0].dtype != torch.uint8:
            raise ValueError(f"{name} must hold uint8 images (0-255), not {data[0].dtype}")
    # weights that multiply (matrices, kernels) decay; biases, norms, tokens, positions do not
    decay = [p for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0)]
    optimizer = torch.optim.AdamW(groups, lr)
    classes = model.config["num_classes"]
    # images blended, or a box pasted in from another image; their targets alike
    mixes = T.RandomChoice([T.MixUp(alpha=mixup_alpha, num_classes=classes),
                            T.CutMix(num_classes=classes)], p=[1 - cutmix_share, cutmix_share])
    mix_batch = mixes if mix else T.Identity()  # labels (b,) -> probabilities (b, classes)
    # each image on its own: a crop of min_scale..1 of its area (aspect 3/4..4/3), resized back,
    # mirrored half the time, then changed by one op (colour, contrast, shear...) of random strength
    augment = T.Compose([T.RandomResizedCrop(images.shape[-1], scale=(min_scale, 1)),
                         T.RandomHorizontalFlip(0.5 if flip else 0),
                         T.TrivialAugmentWide() if trivial_augment else T.Identity()])
    history = resume["history"] if resume else dict(train_loss=[], test_loss=[], test_acc=[])
    if resume:  # the weights, moments and random numbers as left
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])  # every random number is drawn on the CPU
        print(f"resuming at epoch {len(history['train_loss']) + 1} of {epochs}")
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
            inputs = normalise(torch.stack([augment(image) for image in images[batch]]))
            inputs, targets = mix_batch(inputs, labels[batch])
            # bf16 matrix multiplies on CUDA, float32 everywhere else
            with torch.autocast("cuda", torch.bfloat16, enabled=inputs.is_cuda):
                loss = F.cross_entropy(model(inputs), targets, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            loss_sum += loss.detach()
        train_loss = loss_sum.item() / steps  # .item() waits for the device: a fair clock
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"the training loss is {train_loss} in epoch {epoch + 1}")
        test_loss, test_acc = evaluate(model, *test_data)
        for key, value in zip(history, (train_loss, test_loss, test_acc)):
            history[key].append(value)
        if path:  # all that resume needs, and keep
            save({"model": model.state_dict(), "config": model.config, "history": history,
                  "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
                 | (keep or {}), path)
        minutes_left = (time.perf_counter() - epoch_started) * (epochs - epoch - 1) / 60
        print(f"epoch {epoch + 1}/{epochs}  train loss {train_loss:.3f}  test loss {test_loss:.3f}"
              f"  test acc {test_acc:.1%}  {minutes_left:.1f} min left")
    return history

# ------------------------------------------------------------------------------------ plots
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
    for axis, image, heat, label, guess in zip(figure.subplots(1, len(images), squeeze=False)[0],
                                               images, maps, labels.tolist(), guesses.tolist()):
        axis.set_title(f"{classes[label]}\npredicted {classes[guess]}", fontsize=9,
                       color="green" if guess == label else "red")
        axis.imshow(image.permute(1, 2, 0).cpu().numpy())
        axis.imshow(heat[0].cpu().numpy(), cmap="inferno", alpha=0.5)
        axis.axis("off")
    figure.suptitle("the class token's attention to each patch in the last block, heads averaged")
    figure.savefig(path, dpi=100, bbox_inches="tight")

# ----------------------------------------------------------------------------- command line
def count(text):  # argparse's type for sizes and counts
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)

def parse(argv):  # the options, checked, and the names of those typed
    parser = argparse.ArgumentParser(  # no usage block: an error is one line
        description=__doc__.splitlines()[0], usage=argparse.SUPPRESS, allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    recipe = train.__kwdefaults__  # train()'s keywords and their defaults
    add("--data-dir", type=os.path.abspath, default="data", help="images in train/<class>/ and "
        "test/<class>/, or in <class>/ alone; else Oxford-IIIT Pet, downloaded there")
    add("--out-dir", default="out", help="where vit.pt and the plots go")
    add("--epochs", type=count, default=recipe["epochs"], help="passes over the training set")
    add("--batch-size", type=count, default=recipe["batch_size"], help="images per step")
    add("--lr", type=float, default=recipe["lr"], help="peak learning rate")
    add("--image-size", type=count, default=96, help="pixels a side")
    add("--patch-size", type=count, default=12, help="pixels a patch side")
    add("--dim", type=count, default=128, help="width of a token")
    add("--depth", type=count, default=4, help="transformer blocks")
    add("--heads", type=count, default=4, help="attention heads per block")
    add("--mlp-dim", type=count, default=256, help="hidden width of each MLP")
    add("--seed", type=int, default=0, help="for the weights, the batches and a held-out split")
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    add("--device", choices=["cpu", "cuda", *gpus] if gpus else ["cpu"],
        default="cuda" if gpus else "cpu", help="where to train and predict")
    add("--resume", action="store_true", help="go on with the run in --out-dir")
    add("--predict", nargs="+", metavar="IMAGE", help="classify images with the run in --out-dir")
    args = parser.parse_args(argv)
    typed = {word.split("=")[0][2:].replace("-", "_") for word in argv if word.startswith("--")}
    if (args.resume or args.predict) and typed - {"resume", "predict", "out_dir", "data_dir",
                                                  "device"}:
        parser.error("--resume and --predict take the run's options: only --out-dir, --data-dir "
                     "and --device go with them")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be a positive number, not {args.lr}")
    if args.image_size % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} must divide --image-size {args.image_size}")
    if args.dim % args.heads:
        parser.error(f"--heads {args.heads} must divide --dim {args.dim}")
    return args, typed

def load_run(path):  # vit.pt as train() saved it, and its model; or an error in one line
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = ViT(**checkpoint["config"])
        model.load_state_dict(checkpoint["model"])
        if not {"options", "classes"} <= checkpoint.keys():  # as train() alone saves it
            raise KeyError("the options and classes that vit.py's command line saves with a run")
    except Exception as error:  # missing, half written, or saved by something else
        raise UserError(f"{path} holds no run of vit.py ({type(error).__name__})") from None
    return checkpoint, model

def predict(model, paths, classes, device):  # each image's three likeliest classes, a line each
    images = load_images(paths, model.config["image_size"]).to(device)
    with torch.no_grad():
        logits = model.to(device).eval()(normalise(images))  # (n, classes)
    for path, chances in zip(paths, logits.softmax(dim=-1)):
        likeliest = chances.topk(min(3, len(classes))).indices.tolist()
        print(f"{path}: " + ", ".join(f"{classes[i]} {100 * chances[i]:.1f} %" for i in likeliest))

def run(args, path, checkpoint=None):  # train and draw, from scratch or from the checkpoint
    if path.exists() and not checkpoint:
        raise FileExistsError(f"{path} holds a run: go on with --resume, or use another --out-dir")
    out_dir, data_dir = Path(args.out_dir).resolve(), Path(args.data_dir).resolve()
    if out_dir.is_relative_to(data_dir):
        raise UserError(f"--out-dir {args.out_dir} is inside --data-dir {args.data_dir}")
    train_set, test_set, classes = open_data(args.data_dir, args.seed)
    tested = [str(Path(file).relative_to(args.data_dir)) for file in test_set[0]]
    began_with = checkpoint or dict(classes=classes, tested=tested)
    if [began_with["classes"], began_with.get("tested", tested)] != [classes, tested]:
        raise UserError(f"{args.data_dir} holds other classes or test images than the run in "
                        f"{path}: --resume needs the data it began with")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"--out-dir {args.out_dir} is not writable")
    torch.manual_seed(args.seed)
    model = ViT(args.image_size, args.patch_size, len(classes), args.dim, args.depth,
                args.heads, args.mlp_dim).to(args.device)
    print(f"decoding {len(train_set[0])} training and {len(test_set[0])} test images")
    train_data, test_data = [(load_images(files, args.image_size).to(args.device),
                              labels.to(args.device)) for files, labels in (train_set, test_set)]
    keep = dict(options=vars(args), classes=classes, tested=tested)
    history = train(model, train_data, test_data, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, path=path, keep=keep, resume=checkpoint)
    images, labels = test_data
    plot_patches(images[0], args.patch_size, path.with_name("patches.png"))
    plot_history(history, path.with_name("loss.png"))
    shown = torch.linspace(0, len(images) - 1, 4).long()
    plot_attention(model, images[shown], labels[shown], classes, path.with_name("attention.png"))
    print(f"test accuracy {history['test_acc'][-1]:.1%}, plots and vit.pt in {path.parent}")

def main(argv=None):
    args, typed = parse(sys.argv[1:] if argv is None else argv)
    path = Path(args.out_dir) / "vit.pt"
    try:  # what a user can cause ends in one line; a bug keeps its traceback
        if not (args.resume or args.predict):
            return run(args, path)
        checkpoint, model = load_run(path)
        if args.predict:
            return predict(model, args.predict, checkpoint["classes"], args.device)
        renewed = {name: getattr(args, name) for name in typed | {"out_dir", "device"}}
        args = argparse.Namespace(**(checkpoint["options"] | renewed))  # where things are now
        tested = checkpoint["history"]["test_acc"]
        if len(tested) < args.epochs:
            return run(args, path, checkpoint)
        print(f"{path} holds a finished run: {args.epochs} epochs, test accuracy {tested[-1]:.1%}")
    except KeyboardInterrupt:  # vit.pt, if there, holds the last epoch saved whole
        kept = f"{path} keeps the last whole epoch, --resume goes on"
        saved = path.exists() and not args.predict
        print(f"\ninterrupted: {kept if saved else 'nothing saved'}", file=sys.stderr)
        sys.exit(130)
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: {args.device} is out of memory: try a smaller --batch-size")
    except (OSError, UserError, FloatingPointError) as error:  # files, folders, network, NaN
        sys.exit(f"error: {error}")

if __name__ == "__main__":
    main()
