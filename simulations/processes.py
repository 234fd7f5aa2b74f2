"""Stopping the processes a command started, and everything they spawned, before it exits.

Ray (under `fedlearn simulate`) and Flower (under `local-cluster`) start daemons that outlive
their parent when it leaves without stopping them: reparented to init, they keep running and
using CPU. Whoever exits early (Ctrl-C, an error) stops them here first."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable

import psutil


def kill_children(seconds: float = 5.0) -> None:
    """Kill every process this one started (Ray's GCS, raylet, agents and workers included),
    and return once they are gone or ``seconds`` have passed. At once, without a grace period:
    while they stop, this process's other threads go on and would see their clients vanish (the
    server would record a failed round for what is an interrupt). They are frozen first, so
    that none starts another while the tree is collected."""
    frozen: dict[int, psutil.Process] = {}
    while True:
        try:
            found = [p for p in psutil.Process().children(recursive=True) if p.pid not in frozen]
        except psutil.Error:
            break
        if not found:
            break
        for child in found:
            _signal(child, signal.SIGSTOP)
            frozen[child.pid] = child
    for child in frozen.values():
        _signal(child, signal.SIGKILL)
    psutil.wait_procs(list(frozen.values()), timeout=seconds)


def stop_process_groups(processes: Iterable[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop processes started in their own sessions, and everything they spawned (SuperExec,
    apps; Flower starts the ServerApp detached, in a session of its own): all are asked at once
    (SIGTERM), so that stopping a cluster takes one ``grace`` period at most, not one per process;
    those still running after it are killed."""
    processes = list(processes)
    spawned = _descendants(processes)
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    for child in spawned:
        _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    psutil.wait_procs(spawned, timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        _signal_group(process, signal.SIGKILL)  # the stragglers, and children that outlived their parent
        process.wait()
    for child in spawned:
        _signal(child, signal.SIGKILL)
    _wait_until_gone({process.pid for process in processes}, spawned, grace)


def _descendants(processes: list[subprocess.Popen]) -> list[psutil.Process]:
    found = []
    for process in processes:
        try:
            found += psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            pass
    return found


def _signal(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.Error:
        pass


def _wait_until_gone(groups: set[int], spawned: list[psutil.Process], seconds: float) -> None:
    """Return once no live process is left in ``groups`` or among ``spawned``: a killed process
    can take a moment to exit, and whoever stops a cluster expects it gone when stop() returns."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(is_alive(child) for child in spawned) and not any(
                _in_groups(process, groups) for process in psutil.process_iter(["status"])):
            return
        time.sleep(0.05)


def _in_groups(process: psutil.Process, groups: set[int]) -> bool:
    try:
        return process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) in groups
    except (OSError, psutil.Error):
        return False


def is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
