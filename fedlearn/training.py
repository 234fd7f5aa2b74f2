"""Local training and evaluation: the loop every client runs, short enough to read at once."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedlearn.config import RunConfig
from fedlearn.data import Split
from fedlearn.errors import ConfigError


def select_device(requested: str) -> torch.device:
    """auto picks CUDA when present; asking for CUDA where there is none is an error."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(["device=cuda but no CUDA GPU is visible; use device=auto or device=cpu"])
        return torch.device("cuda")
    return torch.device("cpu")


def mixed_precision(device: torch.device, amp: str):
    """The autocast context and GradScaler for ``amp`` on ``device``: bf16 needs no scaler, fp16
    needs one (its narrow exponent underflows small gradients); CPU always trains in fp32."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext(), None
    bf16 = torch.cuda.is_bf16_supported()
    if amp == "bf16" and not bf16:
        raise ConfigError([f"amp=bf16 but {torch.cuda.get_device_name(device)} has no bf16: use amp=fp16 or amp=auto"])
    if amp == "bf16" or (amp == "auto" and bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array to ``device``; on CUDA through pinned memory, so the copy can overlap work."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """``model`` itself (eager) or its torch.compile'd forward, which shares its parameters: the
    caller's state_dict keeps its names either way."""
    return model if mode == "off" else torch.compile(model, mode=mode)


def make_optimizer(model: nn.Module, config: RunConfig, lr: float) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=config.weight_decay)


def round_lr(config: RunConfig, server_round: int) -> float:
    """Learning rate after per-round decay: lr * lr-decay^(round-1)."""
    return config.lr * config.lr_decay ** max(0, server_round - 1)


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    loss: float  # mean training loss over the last local epoch (data term only)
    accuracy: float  # training accuracy over the last local epoch
    steps: int


def train(
    model: nn.Module,
    split: Split,
    config: RunConfig,
    server_round: int,
    *,
    seed: int,
    device: torch.device | None = None,
    shard: tuple[int, int] = (0, 1),
) -> TrainResult:
    """Train ``model`` in place for ``local-epochs`` epochs on ``split``.

    ``shard`` is (rank, world size) when ``model`` is one DistributedDataParallel replica: every
    rank draws the same batches and trains on every world-th example of each, with its loss
    scaled by world / batch so that DDP's gradient average is the whole batch's mean gradient,
    the gradient one process would take. The returned metrics cover every rank.
    """
    device = device or select_device(config.device)
    rank, world = shard
    model.to(device).train()
    forward = compiled(model, config.compile)
    x, y = to_device(split.x, device), to_device(split.y, device)
    optimizer = make_optimizer(model, config, round_lr(config, server_round))
    autocast, scaler = mixed_precision(device, config.amp)
    loss_fn = nn.CrossEntropyLoss(reduction="mean" if world == 1 else "sum")
    # FedProx: keep the received global weights to pull the local ones towards them.
    global_params = (
        [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else None
    )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator: the same client and round, the same masks
    n, steps = len(split), 0
    for _ in range(config.local_epochs):
        order = torch.randperm(n, generator=generator).to(device)
        # Accumulate on the device: a .item() per step would stall a GPU at every batch.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            mine = batch[rank::world] if world > 1 else batch
            xb, yb = x[mine], y[mine]
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = forward(xb)
                data_loss = loss_fn(logits, yb)
                if world > 1:
                    data_loss = data_loss * (world / len(batch))
            loss = data_loss.float()
            if config.l1 > 0:
                loss = loss + config.l1 * sum(p.abs().sum() for p in model.parameters())
            if global_params is not None:
                drift = sum((p - g).pow(2).sum() for p, g in zip(model.parameters(), global_params))
                loss = loss + 0.5 * config.proximal_mu * drift
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            steps += 1
            loss_sum += data_loss.detach().float() * (len(batch) / world)
            correct += (logits.argmax(1) == yb).sum()
    if world > 1:  # every rank saw its share of each batch: the epoch's figures are their sum
        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
        torch.distributed.all_reduce(totals)
        loss_sum, correct = totals[0], totals[1].round().long()
    return TrainResult(n, loss_sum.item() / max(n, 1), correct.item() / max(n, 1), steps)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split``."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        xb = torch.from_numpy(split.x[start : start + batch_size]).to(device)
        yb = torch.from_numpy(split.y[start : start + batch_size]).to(device)
        logits = model(xb).float()
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(len(split), 1)
    return loss_sum / n, correct / n


def check_finite(state: dict[str, torch.Tensor]) -> None:
    """Refuse to send or keep weights with NaN/Inf (diverged training), naming the tensor."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(
                f"weights '{name}' contain NaN or Inf: training diverged; lower lr or set clip-grad-norm"
            )


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible shuffling seed for each client and round."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])
