"""Language-model runs: a small GPT (models/gpt.py) trained on byte-level text (data/text.py) into a run
directory, in the SSL engine's style.

A run directory holds:
    config.json      the LMConfig
    versions.json    what produced it (quantlab.provenance.environment)
    metrics.jsonl    one line a step: step, loss, lr, gradient norm (before clipping), seconds in
                     forward + backward and in the optimizer step
    validation.jsonl one line an evaluation (step 0, every eval_every steps, the last): validation loss,
                     and for optimizers with a quantized second moment the zero-v statistic per tensor
    checkpoint.pt    model and optimizer state, step, config and both logs; atomic (engine/checkpoint.py)
    metrics.csv, summary.json   at the end

Every step's batch comes from a generator seeded with (seed, step) and the model has no dropout, so a
resumed run is bit-identical to one never stopped. A non-finite loss or gradient ends a run early as
*diverged* (recorded in the summary, not raised): the stability study counts such runs.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import quantlab.optim
from experiments.data.text import CORPORA, VOCAB_SIZE, load_corpus, unigram_cross_entropy
from experiments.engine.checkpoint import (
    check_resumable,
    checkpoint_record,
    load_checkpoint,
    remove_stale_temporaries,
    restore,
    save_atomically,
)
from experiments.engine.config import SavedConfig, _choice, _float_tuple, _integer, _nonnegative
from experiments.engine.loop import derived_seed
from experiments.engine.optimizer import (
    ALGORITHMS,
    LIBRARIES,
    algorithm_hyperparameters,
    check_state_settings,
    optimizer_class_for,
)
from experiments.engine.progress import Progress
from experiments.engine.run import use_threads, write_csv, write_jsonl
from experiments.lr_schedule import set_learning_rate, warmup_cosine
from experiments.models.gpt import EMBEDDINGS, GPT
from experiments.param_groups import parameter_groups
from quantlab.provenance import environment

# a resumed run may change these: they do not touch the training computation up to the saved step
RESUMABLE_CHANGES = {"checkpoint_every"}
EVAL_BATCH = 64  # windows a forward pass during evaluation


@dataclass
class LMConfig(SavedConfig):
    # the model (models/gpt.py); the defaults are nanoGPT's CPU run of character-level Shakespeare
    corpus: str = "shakespeare"
    context: int = 64
    width: int = 128
    depth: int = 4
    heads: int = 4
    embedding: str = "standard"  # or "stable": quantlab.nn.StableEmbedding
    tied: bool = False  # the head shares the token embedding's weight
    # the optimizer (engine/optimizer.py)
    library: str = "quantlab"
    algorithm: str = "adamw"
    state_bits: int | None = None  # None: the library's own (32 for torch, 8 for the others); quantlab: 2-8, 32
    block_size: int = 256  # 0: one block per tensor (the largest parameter's size)
    code: str = "dynamic"
    unsigned_code: str = "same"  # v's code: code's family, or "dynamic-zero-free" / "linear-zero-free"
    unsigned_normalization: str = "blockwise"  # or "rank1" (v of matrices: a row and a column maximum)
    min_8bit_size: int = 4096
    lr: float = 1e-3
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.99)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd's
    grad_clip: float = 1.0  # the largest global gradient norm; 0 = no clipping
    # the run
    steps: int = 2000
    batch_size: int = 12
    seed: int = 0
    eval_every: int = 250
    eval_tokens: int = 65536  # validation windows evaluated, evenly spaced over the validation split
    checkpoint_every: int = 500  # steps; 0 = only at the end
    threads: int | None = None

    def __post_init__(self):
        _choice("corpus", self.corpus, CORPORA)
        _choice("embedding", self.embedding, EMBEDDINGS)
        _choice("library", self.library, LIBRARIES)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        if self.state_bits is None:
            self.state_bits = 32 if self.library == "torch" else 8
        for name, minimum in (("context", 1), ("width", 1), ("depth", 1), ("heads", 1), ("block_size", 0),
                              ("min_8bit_size", 0), ("warmup_steps", 0), ("steps", 1), ("batch_size", 1),
                              ("eval_every", 1), ("eval_tokens", 1), ("checkpoint_every", 0)):
            _integer(name, getattr(self, name), minimum)
        _integer("seed", self.seed, None)
        if self.threads is not None:
            _integer("threads", self.threads, 1)
        for name in ("lr", "weight_decay", "eps", "momentum", "grad_clip"):
            setattr(self, name, _nonnegative(name, getattr(self, name)))
        self.betas = _float_tuple("betas", self.betas, 2)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if not isinstance(self.tied, bool):
            raise ValueError(f"tied must be true or false, got {self.tied!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        check_state_settings(self.library, self.algorithm, self.state_bits, self.block_size, self.code,
                             self.unsigned_code, self.unsigned_normalization)



def build_model(config: LMConfig) -> GPT:
    torch.manual_seed(config.seed)  # the initial weights
    return GPT(VOCAB_SIZE, config.context, config.width, config.depth, config.heads, config.embedding, config.tied)


def build_optimizer(config: LMConfig, model: GPT) -> torch.optim.Optimizer:
    """The config's optimizer over the model's parameters, matrices weight-decayed (param_groups.py).
    block_size 0 becomes the largest parameter's size (rounded up to a multiple of 4): every tensor
    is one block."""
    block_size = config.block_size or max(p.numel() for p in model.parameters())
    block_size += -block_size % 4  # whole bytes of packed 2- and 4-bit indices
    hyper = algorithm_hyperparameters(config.algorithm, config.lr, config.betas, config.eps, config.weight_decay,
                                      config.momentum)
    cls, options = optimizer_class_for(config.library, config.algorithm, hyper, config.state_bits, block_size,
                                       config.code, config.min_8bit_size, config.unsigned_code,
                                       config.unsigned_normalization)
    return cls(parameter_groups(model.named_parameters(), config.weight_decay), **options)


def batch_at(tokens: torch.Tensor, config: LMConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of `step`: batch_size random windows and the same windows one token later."""
    generator = torch.Generator().manual_seed(derived_seed(config.seed, "batch", step))
    starts = torch.randint(0, len(tokens) - config.context, (config.batch_size, 1), generator=generator)
    positions = starts + torch.arange(config.context)
    return tokens[positions].long(), tokens[positions + 1].long()


def validation_windows(tokens: torch.Tensor, context: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_tokens // context windows evenly spaced over `tokens` (all of it when it holds fewer), with
    their targets: the same set at every evaluation of every run."""
    count = max(1, min(n_tokens // context, (len(tokens) - 1) // context))
    starts = torch.linspace(0, len(tokens) - context - 1, count).long()[:, None]
    positions = starts + torch.arange(context)
    return tokens[positions].long(), tokens[positions + 1].long()


@torch.no_grad()
def validation_loss(model: GPT, windows: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean cross-entropy (nats a token) over the validation windows."""
    model.eval()
    inputs, targets = windows
    total = 0.0
    for i in range(0, len(inputs), EVAL_BATCH):
        chunk = slice(i, i + EVAL_BATCH)
        total += model.loss(inputs[chunk], targets[chunk]).item() * len(inputs[chunk])
    model.train()
    return total / len(inputs)


def second_moment_zeros(model: GPT, optimizer: torch.optim.Optimizer) -> dict | None:
    """Per tensor whose second moment (Adam's v) is quantized: the fraction of elements with a non-zero
    gradient this step whose stored v is exactly 0. v = beta2 * v + (1 - beta2) * g^2 > 0 there, so
    each such 0 is the code's (notebooks/03): the next step divides m by sqrt((1 - beta2) g^2) + eps
    instead of sqrt(v) + eps (by eps alone where that gradient is 0). None for optimizers with no
    quantized v (float32 states, or no second moment). quantlab's states (block-wise or rank-1) and
    torchao's (tensor subclasses with a dequantize method) are read."""
    fractions, zeros, nonzero = {}, 0, 0
    names = {id(p): name for name, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        v = state.get("exp_avg_sq") if isinstance(state, dict) else None
        quantized = isinstance(v, (quantlab.optim.QuantizedState, quantlab.optim.Rank1State)) or (
            torch.is_tensor(v) and type(v) is not torch.Tensor and hasattr(v, "dequantize"))
        if not quantized or p.grad is None:
            continue
        active = p.grad != 0
        stored_zero = (v.dequantize() == 0) & active
        count = int(active.sum())
        fractions[names[id(p)]] = int(stored_zero.sum()) / max(count, 1)
        zeros, nonzero = zeros + int(stored_zero.sum()), nonzero + count
    if not fractions:
        return None
    return {"fraction": zeros / max(nonzero, 1), "per_tensor": fractions}


def train_language_model(config: LMConfig, out_dir, resume: bool = False, progress: bool = True,
                         overwrite: bool = False) -> dict:
    """Train for config.steps in out_dir; returns the summary (also summary.json). resume=True continues
    from out_dir/checkpoint.pt; without it an existing checkpoint is an error unless overwrite=True."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    use_threads(config.threads)
    corpus = load_corpus(config.corpus)
    if len(corpus.train) <= config.context:
        raise ValueError(f"corpus {config.corpus}'s train split ({len(corpus.train)} tokens) is not longer "
                         f"than the context ({config.context})")
    windows = validation_windows(corpus.validation, config.context, config.eval_tokens)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    log = {"train": [], "validation": [], "diverged_at": None}
    step, elapsed_before = 0, 0.0
    if resume:
        checkpoint = load_checkpoint(out_dir)
        check_resumable(checkpoint["config"], config, checkpoint["step"], config.steps, RESUMABLE_CHANGES)
        restore(checkpoint, model, optimizer, out_dir)
        log, step, elapsed_before = checkpoint["metrics"], checkpoint["step"], checkpoint["elapsed_s"]
    elif (out_dir / "checkpoint.pt").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run: resume it, or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    config.save(out_dir / "config.json")
    (out_dir / "versions.json").write_text(json.dumps(environment(), indent=2) + "\n")
    write_jsonl(out_dir / "metrics.jsonl", log["train"])  # on resume: cut back to the checkpoint's step
    write_jsonl(out_dir / "validation.jsonl", log["validation"])

    def save_checkpoint():
        save_atomically(checkpoint_record(
            model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
            epoch=step * config.batch_size * config.context // len(corpus.train), config=config.to_dict(),
            metrics=log, elapsed_s=elapsed_before + time.perf_counter() - started, world_size=1),
            out_dir / "checkpoint.pt")

    def evaluate():
        record = {"step": step, "val_loss": validation_loss(model, windows),
                  "v_zeros": second_moment_zeros(model, optimizer) if step else None}
        log["validation"].append(record)
        with open(out_dir / "validation.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    if step == 0:
        evaluate()  # the untrained model: the baseline every run starts from
    bar = Progress(config.steps, step, progress)
    parameters = list(model.parameters())
    with open(out_dir / "metrics.jsonl", "a") as metrics_file:
        while step < config.steps and log["diverged_at"] is None:
            inputs, targets = batch_at(corpus.train, config, step)
            lr = set_learning_rate(optimizer, config.lr, warmup_cosine(step, config.warmup_steps, config.steps))
            start = time.perf_counter()
            loss = model.loss(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip or math.inf).item()
            model_done = time.perf_counter()
            loss = loss.item()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                log["diverged_at"] = step  # the step whose loss or gradient is not finite: not taken
                break
            optimizer.step()
            step += 1
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "model_s": model_done - start,
                      "optimizer_s": time.perf_counter() - model_done}
            log["train"].append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.update(record)
            if step % config.eval_every == 0 or step == config.steps:
                evaluate()
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                save_checkpoint()
    save_checkpoint()
    summary = summarize(log, config, corpus, windows, optimizer, elapsed_before + time.perf_counter() - started)
    if log["train"]:
        write_csv(out_dir / "metrics.csv", log["train"])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(log: dict, config: LMConfig, corpus, windows, optimizer, elapsed_s: float) -> dict:
    """Where the run ended against its baselines (the untrained model, the unigram model), and its cost."""
    train, validation = log["train"], log["validation"]
    zeros = [r["v_zeros"]["fraction"] for r in validation if r["v_zeros"] is not None]
    return {
        "steps": len(train),
        "diverged_at": log["diverged_at"],
        "final_val_loss": validation[-1]["val_loss"] if log["diverged_at"] is None else None,
        "best_val_loss": min(r["val_loss"] for r in validation),
        "untrained_val_loss": validation[0]["val_loss"],
        "unigram_val_loss": unigram_cross_entropy(corpus.train, windows[1]),
        "mean_loss_last_10": sum(r["loss"] for r in train[-10:]) / max(1, len(train[-10:])),
        "v_zero_fraction_max": max(zeros) if zeros else None,
        "v_zero_fraction_mean": sum(zeros) / len(zeros) if zeros else None,
        "elapsed_s": elapsed_s,
        "model_ms_per_step": 1e3 * statistics.median(r["model_s"] for r in train) if train else None,
        "optimizer_ms_per_step": 1e3 * statistics.median(r["optimizer_s"] for r in train) if train else None,
        "optimizer_state_bytes": quantlab.optim.state_bytes(optimizer),
    }
