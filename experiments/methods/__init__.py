"""Self-supervised methods, one module each with its loss as a pure function:

    moco.py (MoCo v2), simclr.py (SimCLR), dino.py (DINO), swav.py (SwAV), mae.py (MAE)
    base.py       SSLMethod, the interface the engine trains
    multicrop.py  the multi-crop views and cross-view losses DINO and SwAV share

    method = make_method("moco", backbone, feature_dim, queue_size=1024)
    loss = method([augment(x, c, generator) for c in method.view_configs(AugmentConfig())])
"""
from __future__ import annotations

import inspect

from torch import nn

from experiments.methods.base import SSLMethod
from experiments.methods.dino import DINO
from experiments.methods.mae import MAE
from experiments.methods.moco import MoCo
from experiments.methods.simclr import SimCLR
from experiments.methods.swav import SwAV

METHODS = {"moco": MoCo, "simclr": SimCLR, "dino": DINO, "swav": SwAV, "mae": MAE}


def make_method(name: str, backbone: nn.Module, feature_dim: int, **options) -> SSLMethod:
    """METHODS[name](backbone, feature_dim, **options); options are the method's keyword arguments."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    method = METHODS[name]
    allowed = list(inspect.signature(method).parameters)[2:]  # after backbone, feature_dim
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; it takes {allowed}")
    return method(backbone, feature_dim, **options)
