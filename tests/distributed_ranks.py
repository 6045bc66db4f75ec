"""Run code on several CPU processes joined by a gloo process group, for the distributed tests.

`run_ranks(world_size, scenario, *args)` spawns world_size processes; each initializes a gloo
group (every collective under `timeout` seconds, so a bug fails instead of hanging), calls
`scenario(rank, world_size, *args)` (a module-level function, importable by name) and sends back
what it returned, or the exception it raised. The parent returns one entry per rank.
"""
import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp


class RankFailed:
    """What a rank raised: its type, message and traceback (exceptions need not pickle)."""

    def __init__(self, error: BaseException):
        self.type, self.message = type(error).__name__, str(error)
        self.traceback = traceback.format_exc()

    def __repr__(self):
        return f"RankFailed({self.type}: {self.message})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, timeout, result_dir, scenario, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        result = scenario(rank, world_size, *args)
    except BaseException as error:  # reported to the parent, whatever it is
        result = RankFailed(error)
    Path(result_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def run_ranks(world_size, scenario, *args, timeout=30, deadline=240):
    """[what rank 0 returned, what rank 1 returned, ...]; a RankFailed for a rank that raised."""
    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.start_processes(_entry, args=(world_size, _free_port(), timeout, result_dir, scenario, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        for process in context.processes:
            process.join(deadline)
        alive = [p for p in context.processes if p.is_alive()]
        for process in alive:
            process.kill()
        if alive:
            raise TimeoutError(f"{len(alive)} of {world_size} ranks still running after {deadline} s")
        results = []
        for rank in range(world_size):
            path = Path(result_dir, f"{rank}.pkl")
            if not path.exists():
                raise RuntimeError(f"rank {rank} exited ({context.processes[rank].exitcode}) without a result")
            results.append(pickle.loads(path.read_bytes()))
        return results
