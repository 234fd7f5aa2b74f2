"""One client, several processes: its local epochs as a DistributedDataParallel job.

With ``ddp-world-size=N`` the ClientApp spawns N processes on its own machine (NCCL with one GPU
each on CUDA, Gloo on CPU). They meet through a file in a private temporary directory (no port
to pick or leak), each trains on its share of every batch (``training.train``'s ``shard``), DDP
averages their gradients, and rank 0 writes the trained weights back as safetensors: the server
still receives one update. Same data and seed give the update one process would compute, to
float tolerance (dropout layers draw different masks per rank).

The model and data reach the ranks through multiprocessing's pickling between processes of this
node (each rank trains a private copy); nothing received over the network is unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import distributed as dist
from torch import multiprocessing
from torch import nn

from fedlearn.config import RunConfig
from fedlearn.data import Split
from fedlearn.errors import ConfigError
from fedlearn.training import TrainResult, select_device, train

TRAINED = "trained.safetensors"
RESULT = "result.json"


def rank_device(config: RunConfig, rank: int) -> torch.device:
    device = select_device(config.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def check_devices(config: RunConfig) -> None:
    """One GPU per rank on CUDA: say so before spawning rather than let NCCL hang or share one."""
    if select_device(config.device).type == "cuda" and torch.cuda.device_count() < config.ddp_world_size:
        raise ConfigError([
            f"ddp-world-size={config.ddp_world_size} needs one GPU per process but this node sees "
            f"{torch.cuda.device_count()}: lower ddp-world-size, or set device=cpu to train with Gloo on CPU"
        ])


def _rank(rank: int, model: nn.Module, split: Split, config: RunConfig, server_round: int, seed: int, workdir: str) -> None:
    world = config.ddp_world_size
    device = rank_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the node's cores, shared out: N processes each at full width would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{workdir}/rendezvous",
                            rank=rank, world_size=world, timeout=timedelta(seconds=config.round_timeout))
    try:
        # torch's multiprocessing hands CPU tensors over in shared memory: without a private copy
        # every rank's optimizer would step the same weights
        model = copy.deepcopy(model).to(device)
        replica = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        result = train(replica, split, config, server_round, seed=seed, device=device, shard=(rank, world))
        if rank == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f"{workdir}/{TRAINED}")
            Path(workdir, RESULT).write_text(json.dumps(dataclasses.asdict(result)))
        dist.barrier()  # no rank tears its process group down while another is still in a collective
    finally:
        dist.destroy_process_group()


def train_data_parallel(model: nn.Module, split: Split, config: RunConfig, server_round: int, *, seed: int) -> TrainResult:
    """Train ``model`` in place as ``training.train`` does, with ddp-world-size processes."""
    check_devices(config)
    with tempfile.TemporaryDirectory(prefix="fedlearn-ddp-") as workdir:
        # spawn, not fork: the ClientApp runs in a process with threads (Flower, Ray)
        multiprocessing.start_processes(_rank, args=(model.cpu(), split, config, server_round, seed, workdir),
                                        nprocs=config.ddp_world_size, start_method="spawn", join=True)
        model.load_state_dict(load_file(f"{workdir}/{TRAINED}"))
        return TrainResult(**json.loads(Path(workdir, RESULT).read_text()))
