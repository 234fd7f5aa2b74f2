"""Local training throughput (samples/s): fedlearn's client loop against a bare torch loop.

The bare loop is what a PyTorch tutorial writes: the data copied to the device once per call, a
seeded permutation per epoch, zero_grad / forward / cross-entropy / backward / step, with the
same optimizer, batch size and precision. fedlearn's loop (``training.train``) adds what a
federated client needs: round learning-rate decay, optional L1 / proximal terms and clipping,
and training metrics accumulated on the device. The two run alternately in one process on the
same device, so the ratio is measured side by side. On CUDA the fedlearn loop also runs with
``amp=off`` against its default mixed precision.

Throughput does not depend on what the pixels show, so the inputs are seeded random tensors of
each model's shape (32x32x3 for vision-cnn, 28x28 for mnist-cnn): nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import torch
from torch import nn

from fedlearn import data, models
from fedlearn.config import RunConfig
from fedlearn.training import make_optimizer, mixed_precision, select_device, train

DATASETS = {"vision-cnn": "synthetic32", "mnist-cnn": "mnist"}  # whose input shape each model is measured on


def random_split(shape: tuple[int, ...], examples: int, seed: int = 0) -> data.Split:
    rng = np.random.default_rng(seed)
    return data.Split(rng.standard_normal((examples, *shape), dtype=np.float32), rng.integers(0, 10, examples))


def bare_loop(model: nn.Module, split: data.Split, config: RunConfig, device: torch.device, seed: int) -> None:
    """The reference: a plain PyTorch training loop with fedlearn's optimizer and precision."""
    model.to(device).train()
    x, y = torch.from_numpy(split.x).to(device), torch.from_numpy(split.y).to(device)
    optimizer = make_optimizer(model, config, config.lr)
    autocast, scaler = mixed_precision(device, config.amp)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.local_epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for start in range(0, len(y), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fedlearn_loop(model: nn.Module, split: data.Split, config: RunConfig, device: torch.device, seed: int) -> None:
    train(model, split, config, 1, seed=seed, device=device)  # ends with .item(): synchronised


LOOPS = {"bare": bare_loop, "fedlearn": fedlearn_loop}


def measure(model_name: str, *, examples: int, batch_size: int, epochs: int, repeats: int, device: str = "auto") -> dict:
    """Samples/s of each loop (median of ``repeats`` alternating runs, after one warm-up each),
    and on CUDA of the fedlearn loop in fp32 (amp=off) as well."""
    config = RunConfig.from_flat({"model": model_name, "dataset": DATASETS[model_name], "batch-size": batch_size,
                                  "local-epochs": epochs, "device": device, "privacy": "plain"})
    target = select_device(config.device)
    split = random_split(data.spec(config.dataset).shape, examples)
    arms = {name: (loop, config) for name, loop in LOOPS.items()}
    if target.type == "cuda":
        arms["fedlearn_fp32"] = (fedlearn_loop, dataclasses.replace(config, amp="off"))
    model = models.for_run(config, seed=0)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(repeats + 1):  # repeat 0 warms up: allocator, kernels, caches
        for name, (loop, arm_config) in arms.items():
            started = time.perf_counter()
            loop(model, split, arm_config, target, seed=repeat)
            if repeat:
                seconds[name].append(time.perf_counter() - started)
    rate = {name: examples * epochs / statistics.median(times) for name, times in seconds.items()}
    figures = {
        "model": model_name, "device": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
        "examples": examples, "batch_size": batch_size, "epochs": epochs, "repeats": repeats,
        "threads": torch.get_num_threads(),
        **{f"{name}_samples_per_s": round(value, 1) for name, value in rate.items()},
        "fedlearn_vs_bare": round(rate["fedlearn"] / rate["bare"], 3),
    }
    if "fedlearn_fp32" in rate:
        _, scaler = mixed_precision(target, config.amp)
        figures["amp"] = "fp16" if scaler is not None else "bf16"
        figures["amp_vs_fp32"] = round(rate["fedlearn"] / rate["fedlearn_fp32"], 3)
    return figures
