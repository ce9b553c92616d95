"""A real server process: it binds loopback by default, and an acknowledged label survives kill -9."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from sqlalchemy import func, select

from rufus.studio import commands
from rufus.studio.db import Label, open_database
from rufus.studio.rounds import Candidate, create_round
from tests.studio.conftest import add_people


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_path, port):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rufus.cli", "studio", "serve", "--db", str(db_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not answer within 30 s")


@pytest.fixture()
def studio_db(tmp_path):
    path = tmp_path / "studio.db"
    db, _ = open_database(path)
    create_round(db, "r", "pairwise", [Candidate(f"p{i}", [f"a{i}", f"b{i}"]) for i in range(6)])
    people = add_people(db, "ann")
    db.dispose()
    return path, people["ann"][1]


def test_the_server_binds_loopback_by_default(studio_db):
    assert commands.ServeConfig(db="x").host == "127.0.0.1"
    path, _ = studio_db
    port = free_port()
    proc = start_server(path, port)
    try:
        listening = [
            c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        ]
        assert listening and {a.ip for a in listening} == {"127.0.0.1"} and {a.port for a in listening} == {port}
    finally:
        proc.terminate()
        proc.wait(10)
    out = proc.stdout.read()
    assert f"http://127.0.0.1:{port}" in out and "WARNING" not in out


def test_another_host_prints_a_warning(tmp_path, monkeypatch, capsys):
    # not bound for real: tests only ever listen on 127.0.0.1
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    commands.serve({"db": str(tmp_path / "s.db"), "host": "0.0.0.0", "port": 9})
    err = capsys.readouterr()
    assert seen["host"] == "0.0.0.0" and "WARNING" in err.err and "not loopback" in err.err
    assert "admin login" in err.out  # a new studio prints its admin link once
    commands.serve({"db": str(tmp_path / "s.db"), "port": 9})
    assert "admin login" not in capsys.readouterr().out


def test_an_acknowledged_label_survives_kill_minus_9(studio_db):
    path, token = studio_db
    port = free_port()
    proc = start_server(path, port)
    acknowledged = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/login", params={"token": token}).status_code == 303
            for _ in range(3):
                page = c.get("/rounds/r/next", follow_redirects=True)
                aid = int(re.search(r'action="/items/(\d+)"', page.text).group(1))
                csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
                r = c.post(f"/items/{aid}", data={"choice": "B", "csrf": csrf})
                assert r.status_code == 303
                acknowledged.append(aid)
            os.kill(proc.pid, signal.SIGKILL)  # right after the last acknowledgement
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    proc = start_server(path, port)  # restart on the same file: the labels are there
    try:
        db, _ = open_database(path, create=False)
        with db.session() as s:
            stored = sorted(s.scalars(select(Label.assignment_id)))
            assert s.scalar(select(func.count()).select_from(Label)) == 3
        db.dispose()
        assert stored == sorted(acknowledged)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:  # and the studio carries on
            c.get("/login", params={"token": token})
            assert "3" in c.get("/").text
            assert c.get("/rounds/r/next", follow_redirects=True).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
