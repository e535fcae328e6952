"""Run a test function in real `torch.distributed` gloo process groups on CPU.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, each with RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT set as torchrun would (on a free loopback port), calls
`fn(*args)` in each, and returns the list of their return values ordered by rank. A failure on any
rank raises with that rank's traceback; a rank that does not finish within `timeout` seconds is
killed and the test fails, so a broken collective can never hang CI.

`fn` must be importable at module level (it is pickled by name). It is responsible for calling
`torch.distributed.init_process_group` (usually through `ironcore.parallel.state`), and the harness
destroys the group afterwards if the function left it open.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, env: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(env)
    # Two cores are shared by all ranks: one intra-op thread each avoids oversubscription.
    import torch
    torch.set_num_threads(1)
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent, then exit
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0,
                    env: dict | None = None) -> list:
    """Run `fn(*args)` on `world_size` gloo ranks; return the per-rank results (rank order).
    ``env`` overrides the launcher variables (e.g. ``LOCAL_WORLD_SIZE`` to simulate nodes)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, env or {}), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if ok:
                outcomes[rank] = value
            else:
                failures.append(f"rank {rank} failed:\n{value}")
                break  # the other ranks are likely blocked in a collective; stop waiting
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(outcomes))
        failures.append(f"ranks {missing} did not finish within {timeout:.0f}s")
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise AssertionError("\n".join(failures))
    return [outcomes[r] for r in range(world_size)]
