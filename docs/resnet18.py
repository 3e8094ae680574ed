"""The CNN reference in docs/experiments.md: torchvision's ResNet-18 from scratch, trained by
vit.train on vit.py's data, with its crop, flip, Mixup/CutMix, AdamW and schedule.

    python docs/resnet18.py --data-dir DIR --epochs 42
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vit  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default="data", help="Pet, or train/ and test/ (or val/)")
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--image-size", type=int, default=96)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
started = time.perf_counter()
(train_files, train_labels), (test_files, test_labels), classes = vit.open_data(args.data_dir)
train_data = (vit.load_images(train_files, args.image_size), train_labels)
test_data = (vit.load_images(test_files, args.image_size), test_labels)
torch.manual_seed(args.seed)
model = torchvision.models.resnet18(num_classes=len(classes))
model.config = dict(num_classes=len(classes))  # what vit.train reads of its model
history = vit.train(model, train_data, test_data, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr)
print(f"ResNet-18, {args.epochs} epochs: test accuracy {history['test_acc'][-1]:.1%} "
      f"in {time.perf_counter() - started:.0f} s")
