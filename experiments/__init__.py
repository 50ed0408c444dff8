"""Self-supervised training experiments on quantlab's optimizers, in layers that import only downwards:

    distributed.py   torchrun helpers (batch shares, gathers)
    data/            datasets, sources, mosaics, procedural images, augmentation
    models/          ResNets and the ViT
    methods/         MoCo v2, SimCLR, DINO, SwAV, MAE (one module each, over base.py and multicrop.py)
    lr_schedule.py, param_groups.py   the one warm-up/cosine schedule and the no-decay parameter groups
    eval/            features, k-NN, linear probes, fine-tuning, metrics
    engine/          config, the one-epoch loop, checkpoints, runs, evaluation of runs
    studies/         demo, compare, sweeps, recorded protocols, the quantization report
    __main__.py      the command line: python -m experiments pretrain | evaluate | compare | demo
    bench/           benchmarks (quantlab only, beside the layers)

tests/experiments/test_layers.py checks the direction.
"""
