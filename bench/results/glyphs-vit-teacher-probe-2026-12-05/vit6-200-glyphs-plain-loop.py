"""The trainer's tiny-subset ViT run (vit6-200-glyphs-trainer.csv) as a plain PyTorch loop: the
same 200 training glyphs (2 a class, no crop or flip), the same timm ViT, AdamW 1e-3 with weight
decay 0.05, batch 32, 30 epochs of a per-epoch cosine, fp32. Writes the per-epoch mean training
loss to vit6-200-glyphs-plain-loop.csv beside this file.

Usage: python vit6-200-glyphs-plain-loop.py TREE, where TREE/train/<class>/*.jpeg holds the
subset (the first two images of each class of the glyphs' train split)."""

import glob
import math
import os
import sys

import numpy as np
import timm
import timm.optim
import torch
from PIL import Image

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
EPOCHS, BATCH, LR = 30, 32, 1e-3


def main(tree):
    torch.manual_seed(1)
    files = sorted(glob.glob(os.path.join(tree, "train", "*", "*.jpeg")))
    classes = sorted({path.split(os.sep)[-2] for path in files})
    pixels = [np.array(Image.open(path).convert("RGB")) for path in files]
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pixels])
    images = (images - IMAGENET_MEAN) / IMAGENET_STD  # the trainer's default for folders
    labels = torch.tensor([classes.index(path.split(os.sep)[-2]) for path in files])
    model = timm.create_model("vit_tiny_patch16_224", num_classes=len(classes), patch_size=4,
                              img_size=32, depth=6)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05)
    rows = []
    for epoch in range(EPOCHS):
        for group in optimizer.param_groups:
            group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * epoch / EPOCHS))
        order, total = torch.randperm(len(images)), 0.0
        for start in range(0, len(images), BATCH):
            batch = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        rows.append(f"{epoch},{total / len(images):.4f}")
        print(rows[-1], flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "vit6-200-glyphs-plain-loop.csv"), "w") as handle:
        handle.write("epoch,train_loss\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
