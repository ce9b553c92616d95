"""Several processes of one torch.distributed group on this machine, talking on 127.0.0.1 only.

torchrun's agent keeps its rendezvous store listening on every interface, and so does torch's own
``env://`` store (a TCPStore binds the wildcard address whatever ``MASTER_ADDR`` says). For runs that
stay on one machine Rufus can do without both:

- `spawn` starts ``nproc`` copies of a command with the variables torchrun would set (``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``,
  ``GLOO_SOCKET_IFNAME=lo``), collects their output in files (a pipe left unread can fill and stall a
  process, and with it every collective of its peers), stops the others when one fails, as torchrun
  does, and stops them all at a time limit;
- `init_loopback_group`, called by every trainer before accelerate looks for a process group, joins
  such processes through a store whose listening socket Rufus binds to 127.0.0.1 itself and hands to
  torch (``TCPStore(master_listen_fd=...)``).

Under torchrun (``TORCHELASTIC_RUN_ID`` set), with another master address, or with one process,
`init_loopback_group` does nothing and accelerate starts the group the usual way.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def init_loopback_group(timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> bool:
    """Start this process's torch.distributed group through a store on 127.0.0.1 when the process was
    started as one of several (``WORLD_SIZE`` > 1) with a loopback ``MASTER_ADDR`` and no launcher
    store (not torchrun). Returns whether it started the group."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    loopback = os.environ.get("MASTER_ADDR") in (LOOPBACK, "localhost")
    if world < 2 or not loopback or "TORCHELASTIC_RUN_ID" in os.environ or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    rank, port = int(os.environ["RANK"]), int(os.environ["MASTER_PORT"])
    fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(128)
        fd = sock.detach()  # the store owns the socket from here
    store = dist.TCPStore(LOOPBACK, port, world, rank == 0, timeout, master_listen_fd=fd)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return True


@dataclasses.dataclass
class Finished:
    """How a `spawn` ended: the first failing process's exit status (124 at the time limit, 0 when all
    succeeded) and each process's combined output, by rank."""

    returncode: int
    outputs: list[str]
    timed_out: bool = False

    @property
    def output(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{out}" for r, out in enumerate(self.outputs))


def spawn(
    argv: list[str],
    nproc: int,
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> Finished:
    """Run `argv` as `nproc` processes of one group on this machine (see the module's docstring). One
    process gets no ``WORLD_SIZE`` and runs alone."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    base = dict(os.environ if env is None else env)
    if nproc > 1:
        base.update(
            MASTER_ADDR=LOOPBACK,
            MASTER_PORT=str(free_port()),
            GLOO_SOCKET_IFNAME="lo",
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
        )
    with tempfile.TemporaryDirectory(prefix="rufus-spawn-") as tmp:
        logs = [Path(tmp) / f"rank-{r}.log" for r in range(nproc)]
        procs = []
        for rank, log in enumerate(logs):
            rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else base
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        argv, cwd=cwd, env=rank_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        code, timed_out = _wait(procs, timeout)
        outputs = [log.read_text(errors="replace") for log in logs]
    return Finished(code, outputs, timed_out)


def _wait(procs: list[subprocess.Popen], timeout: float | None) -> tuple[int, bool]:
    deadline = None if timeout is None else time.monotonic() + timeout
    failed = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0)), 0)
            if failed or all(c is not None for c in codes):
                return failed, False
            if deadline is not None and time.monotonic() > deadline:
                return 124, True
            time.sleep(0.1)
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Stop every process still running, and whatever it started (each leads its own session)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    end = time.monotonic() + grace
    while any(p.poll() is None for p in alive) and time.monotonic() < end:
        time.sleep(0.05)
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # also the children of those that ended
        p.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
