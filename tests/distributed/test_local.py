"""Processes of one group on this machine (rufus.distributed.local): the group's stores and gloo listen
on 127.0.0.1 only; a failing process stops its peers; the time limit stops them all."""

from __future__ import annotations

import json
import sys
import time

import pytest

from rufus.distributed.local import spawn

WORKER = r"""
import json, os, socket, sys
sys.path.insert(0, SRC)
import torch, torch.distributed as dist
from rufus.distributed.local import init_loopback_group

def listening():
    # the listening TCP sockets this process owns: /proc/net/tcp and tcp6 rows in state 0A (LISTEN)
    # whose inode is one of this process's descriptors
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in list(f)[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    found.append(cols[1].split(":")[0])
    return found

assert init_loopback_group()
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
dist.barrier()
print(json.dumps({"rank": dist.get_rank(), "sum": total.item(), "listening": listening()}))
dist.barrier()
dist.destroy_process_group()
"""

LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc/net/tcp writes them


@pytest.mark.multiprocess
def test_the_group_works_and_listens_on_loopback_only(tmp_path):
    src = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("SRC", repr(src)))
    done = spawn([sys.executable, str(script)], 2, timeout=120)
    assert done.returncode == 0, done.output[-4000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out in done.outputs]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["sum"] == 3.0 for r in reports)  # 1 + 2: the all-reduce went through
    assert reports[0]["listening"], "rank 0 holds the store: it must listen somewhere"
    for r in reports:
        assert set(r["listening"]) <= LOOPBACK_HEX, r


def test_one_failing_process_stops_its_peers():
    start = time.monotonic()
    # rank 1 fails at once; rank 0 would sleep a minute
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    done = spawn([sys.executable, "-c", code], 2, timeout=120)
    assert done.returncode == 3 and not done.timed_out
    assert time.monotonic() - start < 30


def test_the_time_limit_stops_every_process_and_its_children():
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started', flush=True); "
        "time.sleep(60)"
    )
    done = spawn([sys.executable, "-c", code], 2, timeout=3)
    assert done.timed_out and done.returncode == 124
    assert all("started" in out for out in done.outputs)


def test_one_process_runs_alone_without_group_variables():
    code = "import os; print(os.environ.get('WORLD_SIZE'), os.environ.get('RANK'))"
    done = spawn([sys.executable, "-c", code], 1, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0 and done.outputs[0].split() == ["None", "None"]
    with pytest.raises(ValueError):
        spawn([sys.executable, "-c", "pass"], 0)
