"""What a run's ViT learned, as in figure 7 of the ViT paper, beside the same model as it started.

    python docs/learned.py --out-dir out    # reads out/vit.pt, writes out/learned.png
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vit  # noqa: E402


def principal_components(weight, count=28):  # (dim, features) -> (count, features), rows
    centred = weight - weight.mean(dim=0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[:count]


def position_similarity(positions):  # (n, dim) -> (n, n): the cosine of each pair
    unit = F.normalize(positions, dim=-1)
    return unit @ unit.T


def patch_distances(side, patch_size):  # (n, n): pixels between the centres of two patches
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centres = torch.stack([rows.flatten(), columns.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


def mean_attention_distance(weights, distances):  # (b, heads, n + 1, n + 1) -> (b, heads)
    patches = weights[:, :, 1:, 1:]  # the class token left out, as query and as key
    patches = patches / patches.sum(dim=-1, keepdim=True)  # each query's weights sum to 1 again
    return (patches * distances).sum(dim=-1).mean(dim=-1)  # over keys, then over queries


@torch.no_grad()
def attention_distances(model, images):  # uint8 (b, 3, s, s) -> (depth, heads), in pixels
    side = model.config["image_size"] // model.config["patch_size"]
    distances = patch_distances(side, model.config["patch_size"])
    for block in model.blocks:
        block.attn.keep_weights = True
    totals = torch.zeros(model.config["depth"], model.config["heads"])
    for batch in images.split(64):
        model.eval()(vit.normalise(batch))
        for depth, block in enumerate(model.blocks):
            totals[depth] += mean_attention_distance(block.attn.weights, distances).sum(dim=0)
    return totals / len(images)


def draw_filters(subfigure, model):
    p = model.config["patch_size"]
    components = principal_components(model.patch_embed.proj.weight.detach())
    axes = subfigure.subplots(4, 7).flatten()
    for axis, component in zip(axes, components):
        low, high = component.min(), component.max()
        image = ((component - low) / (high - low)).view(3, p, p).permute(1, 2, 0)  # (p, p, 3)
        axis.imshow(image.numpy())
    for axis in axes:
        axis.axis("off")


def draw_positions(subfigure, similarity, lowest):  # (n, n), one small map for each patch
    side = round(len(similarity) ** 0.5)
    axes = subfigure.subplots(side, side)
    for position, axis in enumerate(axes.flatten()):
        shown = axis.imshow(similarity[position].view(side, side).numpy(), vmin=lowest, vmax=1)
        axis.axis("off")
    subfigure.colorbar(shown, ax=axes, shrink=0.6, label="cosine similarity")


def draw_distances(subfigure, distances, farthest):  # (depth, heads), in pixels
    axis = subfigure.subplots()
    depth, heads = distances.shape
    for head in range(heads):
        axis.scatter(range(1, depth + 1), distances[:, head].numpy(), s=20, label=f"head {head}")
    axis.set(xlabel="block (network depth)", ylabel="mean attention distance (pixels)",
             xticks=range(1, depth + 1), ylim=(0, farthest))
    axis.legend(loc="lower right")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="out", help="the run: its vit.pt")
    parser.add_argument("--data-dir", help="the run's images, if they moved")
    args = parser.parse_args(argv)
    path = Path(args.out_dir) / "vit.pt"
    run = torch.load(path, map_location="cpu", weights_only=True)
    config = run["config"]
    trained = vit.ViT(**config)
    trained.load_state_dict(run["model"])
    torch.manual_seed(run["options"]["seed"])  # as vit.py builds a run's model
    models = {"trained": trained, "as it started": vit.ViT(**config)}
    test_files = vit.open_data(args.data_dir or run["options"]["data_dir"])[1][0]
    images = vit.load_images(test_files, config["image_size"])
    # each patch's position against every other's, the class token's left out
    similarity = {name: position_similarity(model.pos_embedding[0, 1:].detach())
                  for name, model in models.items()}
    lowest = min(table.min().item() for table in similarity.values())
    figure = Figure(figsize=(15, 19), layout="constrained")
    rows = figure.subfigures(3, 2, height_ratios=[1, 1.7, 1])
    for column, (name, model) in enumerate(models.items()):
        draw_filters(rows[0, column], model)
        rows[0, column].suptitle(f"{name}: principal components of the patch embedding")
        draw_positions(rows[1, column], similarity[name], lowest)
        rows[1, column].suptitle(f"{name}: each patch's position against every other's")
        diagonal = config["image_size"] * 2**0.5
        draw_distances(rows[2, column], attention_distances(model, images), diagonal)
        rows[2, column].suptitle(f"{name}: how far each head looks, over {len(images)} test "
                                 "images\n(class token left out, each query's weights summing to "
                                 "1 again), a dot a head")
    figure.savefig(path.with_name("learned.png"), dpi=80)
    print(f"wrote {path.with_name('learned.png')}")


if __name__ == "__main__":
    main()
