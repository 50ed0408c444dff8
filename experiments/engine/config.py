"""Every knob of an SSL pretraining run, in one dataclass.

A config resolves as: the defaults below < a config file (TOML or JSON) < command-line overrides.
It is saved as config.json in the run directory; ``RunConfig.from_dict`` reads that back exactly.
Nested options (``augment``, ``method_options``) merge key by key across the layers.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from experiments.data import DATASETS
from experiments.data.augment import AugmentConfig
from experiments.engine.optimizer import SSL_OPTIMIZERS, check_state_settings
from experiments.methods import METHODS
from experiments.models import BACKBONES

OPTIMIZERS = ("torch-adamw", "quantlab-adamw", "bnb-adamw8bit", "torchao-adamw")
DEVICES = ("cpu", "cuda")


class SavedConfig:
    """What a config dataclass shares: to_dict, from_dict (unknown keys refused, naming the valid ones)
    and save as JSON (config.json of a run directory)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; valid keys: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**values)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass
class RunConfig(SavedConfig):
    # what is trained
    method: str = "moco"
    method_options: dict = field(default_factory=dict)  # passed to methods.make_method
    backbone: str = "resnet-tiny"
    # optimizer: AdamW, with its states in float32 (torch), or quantized (quantlab, bitsandbytes, torchao)
    optimizer: str = "quantlab-adamw"
    state_bits: int | None = None  # None: the optimizer's own (32 for torch-adamw, 8 for the others); quantlab 2-8
    block_size: int = 256
    code: str = "dynamic"
    unsigned_code: str = "same"  # v's code: code's family, or "dynamic-zero-free" / "linear-zero-free"
    unsigned_normalization: str = "blockwise"  # or "rank1"
    min_8bit_size: int = 4096  # quantlab and bitsandbytes keep float32 states for smaller tensors
    shard_optimizer_state: bool = False  # under torchrun: ZeroRedundancyOptimizer, each rank keeps its share
    lr: float = 1e-3
    warmup_epochs: float = 0.0  # linear warm-up, then cosine decay to 0 (MoCo v2's schedule)
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 1
    batch_size: int = 256
    seed: int = 0
    # data
    dataset: str = "fashion-mnist-subset"
    data_root: str | None = None
    train_subset: int | None = None  # the first n images of a fixed permutation of the train split
    augment: dict = field(default_factory=dict)  # AugmentConfig fields
    # run
    checkpoint_every: int = 500  # steps; 0 = only at the end
    device: str = "cpu"
    threads: int | None = None  # torch's and Numba's thread count, when given
    # evaluation of the frozen backbone
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_epochs: int = 100
    eval_subset: int | None = None  # evaluate on at most n images of train and of test (a fixed permutation's first)
    finetune_fractions: tuple = (1.0, 0.25, 0.125)
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3

    def __post_init__(self):
        _choice("method", self.method, tuple(METHODS))
        _choice("backbone", self.backbone, BACKBONES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.state_bits is None:
            self.state_bits = 32 if self.optimizer == "torch-adamw" else 8
        _choice("dataset", self.dataset, DATASETS)
        _choice("device", self.device, DEVICES)
        for name in ("method_options", "augment"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a table of options, got {getattr(self, name)!r}")
        for name, minimum in (("block_size", 1), ("min_8bit_size", 0), ("epochs", 1), ("batch_size", 2),
                              ("checkpoint_every", 0), ("knn_k", 1), ("probe_epochs", 1), ("finetune_epochs", 1)):
            _integer(name, getattr(self, name), minimum)
        _integer("seed", self.seed, None)
        for name in ("train_subset", "threads", "eval_subset"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 1)
        for name in ("lr", "warmup_epochs", "weight_decay", "eps", "knn_temperature", "finetune_lr"):
            setattr(self, name, _nonnegative(name, getattr(self, name)))
        self.betas = _float_tuple("betas", self.betas, 2)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        self.finetune_fractions = _float_tuple("finetune_fractions", self.finetune_fractions, None)
        if not all(0 < f <= 1 for f in self.finetune_fractions):
            raise ValueError(f"finetune_fractions must lie in (0, 1], got {self.finetune_fractions}")
        if not isinstance(self.shard_optimizer_state, bool):
            raise ValueError(f"shard_optimizer_state must be true or false, got {self.shard_optimizer_state!r}")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise ValueError(f"data_root must be a path string, got {self.data_root!r}")
        check_state_settings(SSL_OPTIMIZERS[self.optimizer], "adamw", self.state_bits, self.block_size, self.code,
                             self.unsigned_code, self.unsigned_normalization)
        self.augment = dataclasses.asdict(self.augment_config())

    def augment_config(self) -> AugmentConfig:
        unknown = set(self.augment) - {f.name for f in dataclasses.fields(AugmentConfig)}
        if unknown:
            raise ValueError(f"unknown augment option(s) {sorted(unknown)}; valid: "
                             f"{[f.name for f in dataclasses.fields(AugmentConfig)]}")
        try:
            return AugmentConfig(**self.augment)  # which turns the lists of JSON and TOML into tuples
        except TypeError as error:  # a string where a number belongs
            raise ValueError(f"bad augment option: {error}") from error



def _choice(name, value, choices):
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _integer(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, got {value!r}")


def _nonnegative(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _float_tuple(name, value, length) -> tuple:
    if (not isinstance(value, (list, tuple)) or (length is not None and len(value) != length)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be a list of {length or 'some'} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def read_config_file(path) -> dict:
    """A config file's table: TOML (.toml) or JSON (.json)."""
    path = Path(path)
    if path.suffix == ".toml":
        with open(path, "rb") as f:
            return tomllib.load(f)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"config file must end in .toml or .json, got {path}")


def parse_override(text: str) -> dict:
    """``key=value`` (``augment.blur_p=0``, ``betas=[0.9,0.95]``) -> a nested dict. The value is read
    as JSON where it parses (numbers, true, null, lists), else kept as a string (``method=simclr``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"an override must read key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``; nested tables merge key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(*layers: dict, kind=RunConfig):
    """The defaults of `kind` (RunConfig, or LMConfig of engine/language_model.py), then each layer (a
    config file's table, CLI overrides, ...) in order."""
    values = {}
    for layer in layers:
        values = merge(values, layer)
    return kind.from_dict(values)
