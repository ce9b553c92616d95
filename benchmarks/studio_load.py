"""Load on `rufus studio serve`: many annotators labelling one pairwise round at once, over real HTTP.

    .venv/bin/python benchmarks/studio_load.py [--annotators 20] [--labels 2000] [--labels-per-item 2]

What it does, and what it measures:
1. builds a fresh studio database in a temporary directory with the library (open_database,
   create_round, create_user): one pairwise round of synthetic prompts, each with two different
   responses (one item each), enough items for the target (`--labels`, x1.1 headroom), and one
   annotator per thread with their login token;
2. starts the real server, `python -m rufus.cli studio serve --db PATH --host 127.0.0.1 --port P`, as
   a separate process (one uvicorn process), and waits until it answers;
3. runs the annotators as threads, each with its own httpx.Client (its own cookies), doing what a
   browser does: GET /login?token=... (following the redirect), then, until the global count of
   labels reaches the target or the round has nothing left for them, GET /rounds/{round}/next
   (303 to /items/{id}, or the "All done" page), GET /items/{id}, read the hidden csrf field and
   the form action from the HTML, and POST the form (choice A / B / tie / both_bad at random,
   sometimes a strength with A or B) without following the redirect, expecting 303;
4. checks the database afterwards: labels stored == labels acknowledged (no lost and no extra
   label), no (item, annotator) pair twice, no assignment with two labels, every acknowledged
   assignment has exactly one label (by that annotator), and no item over labels_per_item + SLACK;
5. prints the machine, the wall time of the labelling phase, labels/s, and p50 / p95 / p99 / max
   latencies (ms) of the label POST, of the claim (GET .../next -> 303) and of the item page
   (GET /items/{id}), then the checks and a RESULT json line. Exit status 1 if a check fails.

Logins happen before the clock starts; a login answered 429 (the studio's per-address limit on failed
logins; every login here is valid, so none is expected) is retried and counted. Everything binds and
talks on 127.0.0.1 only; the run is bounded by --timeout seconds; the server is stopped and the
temporary directory removed at the end (--keep keeps it, with the server's log).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from common import WORDS  # noqa: E402  (the benchmarks' word list: standard library only)

HOST = "127.0.0.1"
ROUND = "load"
CHOICES = ("A", "B", "tie", "both_bad")
STRENGTHS = ("", "slightly", "much")  # "" is the page's preselected "not sure"
# Over-labelling allowed per item. An item is offered while fewer than labels_per_item people hold it,
# where an unfinished claim stops counting after rounds.CLAIM_SECONDS (1 h): a claim older than that can
# be re-offered to someone else, and if its first holder still submits, the item gets one label more.
# A run bounded well below CLAIM_SECONDS has no expired claims, so no item may exceed labels_per_item.
SLACK = 0


# --- the studio to load -------------------------------------------------------------------------


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def synthetic_candidates(n: int, seed: int) -> list:
    """n prompts, each with two different responses from two (made-up) models: one pairwise item each."""
    from rufus.studio.rounds import Candidate

    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = f"Question {i}: {sentence(rng, 6, 16)}"
        first = " ".join(sentence(rng, 5, 14) for _ in range(rng.randint(2, 6)))
        second = " ".join(sentence(rng, 5, 14) for _ in range(rng.randint(2, 6)))
        out.append(Candidate(prompt, [first, second + f" ({i})"], ["model-a", "model-b"]))
    return out


def build_studio(path: Path, annotators: int, items: int, labels_per_item: int, seed: int) -> list[dict]:
    """A new studio database at `path` with the round and the annotators; returns [{id, name, token}]."""
    from rufus.studio import auth
    from rufus.studio.db import open_database
    from rufus.studio.rounds import create_round

    db, created = open_database(path)
    assert created, f"{path} already existed"
    try:
        summary = create_round(
            db,
            ROUND,
            "pairwise",
            synthetic_candidates(items, seed),
            labels_per_item=labels_per_item,
            instructions="Which answer is better?",
        )
        assert summary["items"] == items, summary
        people = []
        with db.session() as s:
            for k in range(annotators):
                user, token = auth.create_user(s, f"annotator-{k:03d}")
                people.append({"id": user.id, "name": user.name, "token": token})
    finally:
        db.dispose()  # the server is the only one using the database while the load runs
    return people


# --- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(db_path: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "rufus.cli",
        "studio",
        "serve",
        "--db",
        str(db_path),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(
            cmd,
            cwd=str(ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own descriptor


def wait_until_ready(base: str, proc: subprocess.Popen, deadline: float, log_path: Path) -> float:
    """Poll GET /login (no token: not rate-limited) until it answers 200; return the seconds it took."""
    import httpx

    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(base + "/login", timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer in time:\n{tail(log_path)}")
        time.sleep(0.05)


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    return proc.returncode


def exit_status(code: int | None) -> str:
    """A process's exit status in words: uvicorn stops gracefully on SIGTERM, then re-raises it (-15)."""
    if code is not None and code < 0:
        return f"exit status {code} (by {signal.Signals(-code).name})"
    return f"exit status {code}"


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


# --- one annotator ------------------------------------------------------------------------------


class FormFinder(HTMLParser):
    """The forms of a page: [{"id", "action", "fields": {name: value of hidden inputs}}]."""

    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self._open = {"id": a.get("id"), "action": a.get("action"), "fields": {}}
            self.forms.append(self._open)
        elif tag == "input" and self._open is not None and a.get("type") == "hidden" and a.get("name"):
            self._open["fields"][a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self._open = None


def label_form(page: str) -> tuple[str, str] | None:
    """(action, csrf) of the item page's label form, or None if the page has none."""
    finder = FormFinder()
    finder.feed(page)
    for form in finder.forms:
        if form["id"] == "label-form" and form["action"] and form["fields"].get("csrf"):
            return form["action"], form["fields"]["csrf"]
    return None


def random_label(rng: random.Random) -> dict[str, str]:
    """The fields a browser sends for a pairwise label (empty text boxes included)."""
    choice = rng.choice(CHOICES)
    strength = rng.choice(STRENGTHS) if choice in ("A", "B") else ""
    return {"choice": choice, "strength": strength, "better_answer": "", "comment": ""}


@dataclass
class Tally:
    """What all annotators share: the label target, the acknowledged labels, latencies and errors."""

    target: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: int = 0  # labels acknowledged or in flight; never above target
    acked: list[tuple[int, int]] = field(default_factory=list)  # (assignment id, user id)
    errors: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: {"post": [], "claim": [], "page": []})
    login_retries: int = 0
    finished: int = 0  # annotators who reached the "All done" page

    def take(self) -> bool:
        """Reserve one label of the target; False when the target is reached."""
        with self.lock:
            if self.taken >= self.target:
                return False
            self.taken += 1
            return True

    def give_back(self) -> None:
        with self.lock:
            self.taken -= 1

    def record(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latency[kind].append(seconds)

    def error(self, who: str, what: str) -> None:
        with self.lock:
            self.errors.append(f"{who}: {what}")


def login(client, person: dict, tally: Tally, deadline: float) -> bool:
    """Open the login link like a browser (following the redirect); wait out a login rate limit (429)."""
    while True:
        r = client.get(f"/login?token={person['token']}", follow_redirects=True)
        if r.status_code == 429 and time.monotonic() < deadline - 5:
            with tally.lock:
                tally.login_retries += 1
            time.sleep(2.0)
            continue
        if r.status_code != 200 or not r.history or r.history[0].status_code != 303:
            tally.error(person["name"], f"login answered {r.status_code}: {r.text[:200]!r}")
            return False
        if "rufus_studio_session" not in client.cookies:
            tally.error(person["name"], "login set no session cookie")
            return False
        return True


def annotate(base: str, person: dict, seed: int, tally: Tally, start: threading.Barrier, deadline: float) -> None:
    """One annotator's session: log in, wait for the others, then label until told to stop."""
    import httpx

    rng = random.Random(seed)
    who = person["name"]
    with httpx.Client(base_url=base, timeout=30.0, follow_redirects=False) as client:
        try:
            ok = login(client, person, tally, deadline)
        except httpx.HTTPError as e:
            tally.error(who, f"login failed: {e!r}")
            ok = False
        try:
            start.wait(timeout=max(1.0, deadline - time.monotonic()))
        except threading.BrokenBarrierError:
            return
        if not ok:
            return
        next_url = f"/rounds/{ROUND}/next"
        while time.monotonic() < deadline and tally.take():
            try:
                t0 = time.perf_counter()
                r = client.get(next_url)
                tally.record("claim", time.perf_counter() - t0)
                if r.status_code == 200:  # nothing left for this annotator
                    tally.give_back()
                    if "All done" not in r.text or label_form(r.text) is not None:
                        tally.error(who, f"GET {next_url} answered 200 without the 'All done' page")
                    else:
                        with tally.lock:
                            tally.finished += 1
                    return
                location = r.headers.get("location", "")
                if r.status_code != 303 or not location.startswith("/items/"):
                    raise RuntimeError(f"GET {next_url} answered {r.status_code} {location!r}: {r.text[:200]!r}")
                t0 = time.perf_counter()
                page = client.get(location)
                tally.record("page", time.perf_counter() - t0)
                form = label_form(page.text) if page.status_code == 200 else None
                if form is None:
                    raise RuntimeError(f"GET {location} answered {page.status_code} without a label form")
                action, csrf = form
                if action != location:
                    raise RuntimeError(f"the form of {location} posts to {action!r}")
                aid = int(action.rsplit("/", 1)[1])
                t0 = time.perf_counter()
                done = client.post(action, data={"csrf": csrf, **random_label(rng)})
                tally.record("post", time.perf_counter() - t0)
                if done.status_code != 303 or done.headers.get("location") != next_url:
                    raise RuntimeError(
                        f"POST {action} answered {done.status_code} "
                        f"{done.headers.get('location')!r}: {done.text[:200]!r}"
                    )
                with tally.lock:
                    tally.acked.append((aid, person["id"]))
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                tally.give_back()
                tally.error(who, str(e) if isinstance(e, RuntimeError) else repr(e))
                return


def run_load(base: str, people: list[dict], target: int, seed: int, deadline: float) -> tuple[Tally, float, bool]:
    """All annotators at once; returns the tally, the wall seconds of the labelling phase, and whether
    every annotator finished before the deadline."""
    tally = Tally(target)
    start = threading.Barrier(len(people) + 1)
    threads = [
        threading.Thread(target=annotate, args=(base, p, seed + k, tally, start, deadline), name=p["name"], daemon=True)
        for k, p in enumerate(people)
    ]
    for t in threads:
        t.start()
    start.wait(timeout=max(1.0, deadline - time.monotonic()))  # every annotator has logged in
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 35.0)  # + the last request's timeout
    wall = time.perf_counter() - t0
    return tally, wall, not any(t.is_alive() for t in threads)


# --- checks -------------------------------------------------------------------------------------


def verify(db_path: Path, labels_per_item: int, acked: list[tuple[int, int]]) -> list[tuple[str, bool, str]]:
    """The database against what the server acknowledged: [(check, passed, detail)]."""
    conn = sqlite3.connect(str(db_path))
    try:
        (round_id,) = conn.execute("SELECT id FROM rounds WHERE name = ?", (ROUND,)).fetchone()
        stored = conn.execute("SELECT COUNT(*) FROM labels WHERE round_id = ?", (round_id,)).fetchone()[0]
        pairs = conn.execute(
            "SELECT item_id, user_id, COUNT(*) FROM labels WHERE round_id = ? "
            "GROUP BY item_id, user_id HAVING COUNT(*) > 1",
            (round_id,),
        ).fetchall()
        doubled = conn.execute(
            "SELECT assignment_id, COUNT(*) FROM labels WHERE round_id = ? GROUP BY assignment_id HAVING COUNT(*) > 1",
            (round_id,),
        ).fetchall()
        by_assignment: dict[int, list[int]] = {}
        rows = conn.execute("SELECT assignment_id, user_id FROM labels WHERE round_id = ?", (round_id,))
        for aid, uid in rows:
            by_assignment.setdefault(aid, []).append(uid)
        not_done = conn.execute(
            "SELECT COUNT(*) FROM labels l JOIN assignments a ON a.id = l.assignment_id "
            "WHERE l.round_id = ? AND a.status != 'done'",
            (round_id,),
        ).fetchone()[0]
        per_item = [
            n for (n,) in conn.execute("SELECT COUNT(*) FROM labels WHERE round_id = ? GROUP BY item_id", (round_id,))
        ]
    finally:
        conn.close()
    acked_ids = [aid for aid, _ in acked]
    wrong = [(aid, uid) for aid, uid in acked if by_assignment.get(aid) != [uid]]
    example = f", e.g. assignment {wrong[0][0]}: labels by {by_assignment.get(wrong[0][0])}" if wrong else ""
    over = sum(n > labels_per_item for n in per_item)
    worst = max(per_item, default=0)
    return [
        ("labels stored == labels acknowledged", stored == len(acked), f"{stored} stored, {len(acked)} acknowledged"),
        ("no (item, annotator) pair labelled twice", not pairs, f"{len(pairs)} pairs twice"),
        ("no assignment with two labels", not doubled, f"{len(doubled)} assignments"),
        (
            "no assignment acknowledged twice",
            len(set(acked_ids)) == len(acked_ids),
            f"{len(acked_ids) - len(set(acked_ids))} repeats",
        ),
        ("each acknowledged assignment has 1 label, by its annotator", not wrong, f"{len(wrong)} wrong{example}"),
        ("every label's assignment is done", not_done == 0, f"{not_done} not done"),
        (
            f"no item over labels_per_item + slack ({labels_per_item} + {SLACK})",
            worst <= labels_per_item + SLACK,
            f"{over} items over {labels_per_item}, most labels on one item {worst}",
        ),
    ]


# --- figures ------------------------------------------------------------------------------------


def percentiles(seconds: list[float]) -> dict[str, float | int]:
    """n and nearest-rank p50 / p95 / p99 / max, in milliseconds."""
    if not seconds:
        return {"n": 0}
    ms = sorted(s * 1000.0 for s in seconds)

    def rank(p: float) -> float:
        return ms[max(0, math.ceil(p / 100.0 * len(ms)) - 1)]

    return {"n": len(ms), "p50": rank(50), "p95": rank(95), "p99": rank(99), "max": ms[-1]}


def machine() -> dict[str, str | int | None]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        **{name: version(name) for name in ("uvicorn", "starlette", "sqlalchemy", "httpx")},
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotators", type=int, default=20, help="concurrent annotators (threads)")
    p.add_argument("--labels", type=int, default=2000, help="labels to give in all (the target)")
    p.add_argument("--labels-per-item", type=int, default=2, help="the round's labels per item")
    p.add_argument(
        "--items",
        type=int,
        default=0,
        help="items in the round (0 = enough for the target: labels / labels-per-item x 1.1)",
    )
    p.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on the whole run, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (database, server log)")
    args = p.parse_args(argv)
    if min(args.annotators, args.labels, args.labels_per_item) < 1 or args.items < 0:
        p.error("--annotators, --labels and --labels-per-item must be at least 1, --items at least 0")
    from rufus.studio.rounds import CLAIM_SECONDS

    if args.timeout >= CLAIM_SECONDS:
        p.error(f"--timeout must stay below CLAIM_SECONDS ({CLAIM_SECONDS:.0f} s) for SLACK = 0 to hold")
    return args


def print_report(
    args, items: int, tally: Tally, wall: float, code: int | None, checks: list[tuple[str, bool, str]]
) -> dict:
    lat = {kind: percentiles(values) for kind, values in tally.latency.items()}
    n = len(tally.acked)
    rate = n / wall if wall else 0.0
    print(
        f"load       {args.annotators} annotators, {n} labels acknowledged in {wall:.2f}s = "
        f"{rate:.1f} labels/s (logins before the clock, {tally.login_retries} login retries); "
        f"server stopped: {exit_status(code)}"
    )
    print(f"{'latency (ms)':36s} {'n':>6s} {'p50':>8s} {'p95':>8s} {'p99':>8s} {'max':>8s}")
    names = {
        "post": "label POST /items/{id} -> 303",
        "claim": "next GET /rounds/{r}/next -> 303",
        "page": "item GET /items/{id} -> 200",
    }
    for kind, name in names.items():
        q = lat[kind]
        figures = " ".join(f"{q[m]:8.1f}" for m in ("p50", "p95", "p99", "max")) if q["n"] else ""
        print(f"{name:36s} {q['n']:6d} {figures}")
    for name, passed, detail in checks:
        print(f"check      {'PASS' if passed else 'FAIL'}  {name}: {detail}")
    for line in tally.errors[:10]:
        print(f"error      {line}")
    return {
        "annotators": args.annotators,
        "labels_per_item": args.labels_per_item,
        "items": items,
        "target": args.labels,
        "labels": n,
        "wall_s": round(wall, 3),
        "labels_per_s": round(rate, 2),
        "latency_ms": {k: {m: round(v, 2) for m, v in q.items()} for k, q in lat.items()},
        "checks": {name: passed for name, passed, _ in checks},
        "passed": all(passed for _, passed, _ in checks),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    items = args.items or math.ceil(args.labels / args.labels_per_item * 1.1)
    expected = min(args.labels, items * min(args.labels_per_item, args.annotators))  # what the round allows
    deadline = time.monotonic() + args.timeout
    facts = machine()
    print(f"machine    {facts['cpus']} CPUs ({facts['cpus_usable']} usable), {facts['platform']}")
    print(
        f"software   python {facts['python']}, SQLite {facts['sqlite']}, uvicorn {facts['uvicorn']}, "
        f"starlette {facts['starlette']}, SQLAlchemy {facts['sqlalchemy']}, httpx {facts['httpx']}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="rufus-studio-load-"))
    db_path, log_path = tmp / "studio.db", tmp / "server.log"
    proc = None
    try:
        t0 = time.perf_counter()
        people = build_studio(db_path, args.annotators, items, args.labels_per_item, args.seed)
        print(
            f"studio     round {ROUND!r}: {items} pairwise items x {args.labels_per_item} labels, "
            f"{len(people)} annotators, built in {time.perf_counter() - t0:.1f}s; "
            f"target {args.labels} labels",
            flush=True,
        )
        port = args.port or free_port()
        base = f"http://{HOST}:{port}"
        proc = start_server(db_path, port, log_path)
        ready = wait_until_ready(base, proc, deadline, log_path)
        print(f"server     pid {proc.pid} on {base}, answering after {ready:.1f}s", flush=True)
        tally, wall, in_time = run_load(base, people, args.labels, args.seed, deadline)
        code = stop_server(proc)
        troubles = [
            line for line in log_path.read_text(errors="replace").splitlines() if "Traceback" in line or "ERROR" in line
        ]
        stored = verify(db_path, args.labels_per_item, tally.acked)
    except RuntimeError as e:
        print(f"error      {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
        if args.keep:
            print(f"kept       {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    first_error = f", first: {tally.errors[0]}" if tally.errors else ""
    checks = [
        ("finished within the timeout", in_time, f"--timeout {args.timeout:.0f}s"),
        ("every request answered as expected", not tally.errors, f"{len(tally.errors)} errors{first_error}"),
        (
            "labels acknowledged == min(target, capacity)",
            len(tally.acked) == expected,
            f"{len(tally.acked)} of {expected} ({tally.finished} annotators saw 'All done')",
        ),
        *stored,
        (
            "server log without errors",
            not troubles,
            f"{len(troubles)} lines" + (f", first: {troubles[0]}" if troubles else ""),
        ),
    ]
    result = print_report(args, items, tally, wall, code, checks)
    print("RESULT " + json.dumps({**result, "machine": facts}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
