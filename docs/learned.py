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

def filter_images(model):  # the patch embedding's components as (count, p, p, 3), in 0..1
    p = model.config["patch_size"]
    components = principal_components(model.patch_embed.proj.weight.detach())
    low, high = components.aminmax(dim=1, keepdim=True)
    scaled = (components - low) / (high - low)  # each from 0 to 1 on its own
    return scaled.view(-1, 3, p, p).permute(0, 2, 3, 1)  # flattened in (c, p1, p2) order

def position_similarity(positions):  # (n, dim) -> (n, n): the cosine of each pair
    unit = F.normalize(positions, dim=-1)
    return unit @ unit.T

def patch_positions(model):  # (n, dim): the patches' positions, the class token's left out
    return model.pos_embedding[0, 1:].detach()

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
    totals = torch.zeros(model.config["depth"], model.config["heads"])
    model.eval()
    for batch in images.split(64):
        for block in model.blocks:
            block.attn.keep_weights = True
        model(vit.normalise(batch))
        for depth, block in enumerate(model.blocks):
            totals[depth] += mean_attention_distance(block.attn.weights, distances).sum(dim=0)
            block.attn.keep_weights = False
    return totals / len(images)

def models(run):  # the run's trained model, and the same model as it started
    trained = vit.ViT(**run["config"])
    trained.load_state_dict(run["model"])
    torch.manual_seed(run["options"]["seed"])  # as vit.py seeds a run, then builds its model
    return {"trained": trained, "as it started": vit.ViT(**run["config"])}

def draw(panels, name, model, similarity, lowest, images):  # one column of three panels
    for axis, image in zip(panels[0].subplots(4, 7).flatten(), filter_images(model)):
        axis.imshow(image.numpy())
        axis.axis("off")
    panels[0].suptitle(f"{name}: principal components of the patch embedding")
    side = round(len(similarity) ** 0.5)
    axes = panels[1].subplots(side, side)
    for position, axis in enumerate(axes.flatten()):
        shown = axis.imshow(similarity[position].view(side, side).numpy(), vmin=lowest, vmax=1)
        axis.axis("off")
    panels[1].colorbar(shown, ax=axes, shrink=0.6, label="cosine similarity")
    panels[1].suptitle(f"{name}: each patch's position against every other's")
    distances = attention_distances(model, images)  # (depth, heads)
    grid = patch_distances(side, model.config["patch_size"])
    axis = panels[2].subplots()
    blocks = range(1, len(distances) + 1)
    for head in range(distances.shape[1]):
        axis.scatter(blocks, distances[:, head].numpy(), s=20, label=f"head {head}")
    axis.axhline(grid.mean().item(), color="grey", linestyle="--", label="uniform attention")
    axis.set(xlabel="block (network depth)", ylabel="mean attention distance (pixels)",
             xticks=blocks, ylim=(0, grid.max().item()))
    axis.legend(loc="upper left")
    panels[2].suptitle(f"{name}: how far each head looks, a dot a head, over {len(images)} test "
                       "images\n(the class token left out, each query's weights summing to 1)")

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="out", help="the run: its vit.pt")
    parser.add_argument("--data-dir", help="the run's images, if they moved")
    args = parser.parse_args(argv)
    path = Path(args.out_dir) / "vit.pt"
    try:
        run = torch.load(path, map_location="cpu", weights_only=True)
        train_split, (test_files, test_labels), classes = vit.open_data(
            args.data_dir or run["options"]["data_dir"])
    except (OSError, EOFError, vit.UserError) as error:  # no run there, or its images moved
        sys.exit(f"error: {path}: {type(error).__name__}: {error}")
    images = vit.load_images(test_files, run["config"]["image_size"])
    runs = models(run)
    similarity = {name: position_similarity(patch_positions(model)) for name, model in runs.items()}
    lowest = min(table.min().item() for table in similarity.values())  # one scale for both
    figure = Figure(figsize=(15, 19), layout="constrained")
    columns = figure.subfigures(3, 2, height_ratios=[1, 1.7, 1]).T  # a column for each model
    for panels, (name, model) in zip(columns, runs.items()):
        draw(panels, name, model, similarity[name], lowest, images)
    figure.savefig(path.with_name("learned.png"), dpi=80)
    print(f"wrote {path.with_name('learned.png')}")

if __name__ == "__main__":
    main()
