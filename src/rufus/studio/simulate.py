"""Simulated annotators that label a studio round over HTTP, exactly as a person's browser does.

`rufus studio simulate` starts the studio on a free loopback port (or uses a running one, `url`),
creates the annotators (`sim-1`, `sim-2`, ...), and each of them, one after the other:
1. opens their login link (the server sets the session cookie and redirects to their next item);
2. reads the item page: the prompt, the responses as shown (A, B, ...), the form's CSRF token;
3. decides with the playground's simulated taste (`rufus.playground.taste.Annotators`: noisy
   Bradley-Terry choices, Plackett-Luce rankings, ratings from the annotator's own weights);
4. posts the form and follows the redirects to the next item, until the "All done" page.

`careless` annotators answer at random; `adversarial` ones answer the opposite of their taste
(the worse response, the reversed ranking, the mirrored rating). Only the standard library speaks
HTTP here (urllib with a cookie jar), so nothing beyond Rufus's own dependencies is needed.
"""

from __future__ import annotations

import http.cookiejar
import itertools
import random
import socket
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Page:
    """What the simulated annotator reads off an item page."""

    url: str
    task: str | None = None  # None: no label form (e.g. the "All done" page)
    action: str | None = None
    csrf: str | None = None
    prompt: list[str] = field(default_factory=list)
    responses: dict[str, str] = field(default_factory=dict)  # letter -> text


class _ItemParser(HTMLParser):
    """Collects the label form, the CSRF token, the prompt turns and the responses of an item page."""

    def __init__(self, page: Page):
        super().__init__(convert_charrefs=True)
        self.page = page
        self.stack: list[tuple[str, dict]] = []
        self.capture: list[str] | None = None
        self.target: tuple[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and a.get("id") == "label-form":
            self.page.task, self.page.action = a.get("data-task"), a.get("action")
        if tag == "input" and a.get("name") == "csrf" and self.page.csrf is None:
            self.page.csrf = a.get("value")
        classes = (a.get("class") or "").split()
        if tag == "article" and "response" in classes:
            self.target = ("response", a.get("data-letter", ""))
        elif tag == "section" and "prompt" in classes:
            self.target = ("prompt", "")
        if tag == "div" and "text" in classes and self.target is not None:
            self.capture = []
        if tag not in ("input", "meta", "link", "br", "img"):
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        if tag == "div" and self.capture is not None:
            text = "".join(self.capture)
            kind, letter = self.target
            if kind == "response":
                self.page.responses[letter] = text
            else:
                self.page.prompt.append(text)
            self.capture = None
        if tag in ("article", "section"):
            self.target = None
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.capture is not None:
            self.capture.append(data)


class Browser:
    """A cookie-keeping HTTP client that follows redirects, as a browser does."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def open(self, path: str, form: dict | None = None) -> Page:
        data = urllib.parse.urlencode(form, doseq=True).encode() if form is not None else None
        with self.opener.open(self.base + path, data=data, timeout=60) as response:
            page = Page(response.geturl())
            _ItemParser(page).feed(response.read().decode("utf-8"))
        return page


KINDS = ("honest", "careless", "adversarial")


class Simulated:
    """One simulated annotator: `kind` honest | careless | adversarial, with taste `index` of `taste`."""

    def __init__(self, taste, index: int, kind: str, seed: int):
        self.taste, self.index, self.kind = taste, index, kind
        self.rng = random.Random(seed)

    def decide(self, page: Page) -> dict:
        prompt = "\n".join(page.prompt)
        letters = sorted(page.responses)
        texts = [page.responses[k] for k in letters]
        if page.task == "pairwise":
            if self.kind == "careless":
                return {"choice": self.rng.choice(["A", "B"])}
            prefers_a = self.taste.compare(prompt, texts[0], texts[1], self.rng, self.index)
            return {"choice": "A" if prefers_a != (self.kind == "adversarial") else "B"}
        if page.task == "ranking":
            order = list(letters)
            if self.kind == "careless":
                self.rng.shuffle(order)
            else:
                ranked = self.taste.rank(prompt, texts, seed=self.rng.randrange(2**31), annotator=self.index)
                order = [letters[texts.index(t)] for t in ranked] + [
                    k for k in letters if page.responses[k] not in ranked
                ]
                if self.kind == "adversarial":
                    order.reverse()
            return {f"rank_{k}": str(order.index(k) + 1) for k in letters}
        from rufus.playground.taste import best_gold

        top = max(best_gold(self.taste.preference), 1e-9)
        form = {}
        for k, text in zip(letters, texts):
            if self.kind == "careless":
                rating = self.rng.randint(1, 7)
            else:
                g = self.taste.score(prompt, text, self.index) + self.rng.gauss(0.0, self.taste.temperature)
                rating = min(7, max(1, 1 + round(6 * g / top)))
                if self.kind == "adversarial":
                    rating = 8 - rating
            form[f"rating_{k}"] = str(rating)
        return form


def label_round(
    url: str, round_name: str, people: list[tuple[str, str, Simulated]], *, limit: int | None = None
) -> dict:
    """Each (name, login token, Simulated) labels the round through `url` until nothing is left for
    them (or `limit` labels each); returns {name: labels given}."""
    done = {}
    for name, token, who in people:
        browser = Browser(url)
        browser.open(f"/login?token={urllib.parse.quote(token)}")
        page = browser.open(f"/rounds/{urllib.parse.quote(round_name, safe='')}/next")
        n = 0
        while page.task is not None and (limit is None or n < limit):
            page = browser.open(page.action, {**who.decide(page), "csrf": page.csrf})
            n += 1
        done[name] = n
    return done


def simulated_people(
    db, round_name: str, kinds: list[str], taste, *, seed: int = 0
) -> list[tuple[str, str, Simulated]]:
    """(name, fresh login token, Simulated) for each of `kinds` (honest | careless | adversarial):
    `sim-1`, `sim-2`, ... for honest ones, `careless-1`, `adversarial-1`, ... for the others. The
    same names come back in every round (so one simulated person's labels can be followed across
    rounds); each is made a member of `round_name`, so their login lands there."""
    from sqlalchemy import select

    from rufus.studio import auth
    from rufus.studio.db import User
    from rufus.studio.rounds import add_member, get_round

    counters: dict[str, int] = {}
    people = []
    with db.session() as s:
        rnd = get_round(s, round_name)
        for j, kind in enumerate(kinds):
            if kind not in KINDS:
                raise ValueError(f"simulated annotators are {', '.join(KINDS)}, not {kind!r}")
            counters[kind] = counters.get(kind, 0) + 1
            name = f"{'sim' if kind == 'honest' else kind}-{counters[kind]}"
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                user, token = auth.create_user(s, name)
            else:
                token = auth.rotate_token(s, name)
            add_member(s, user, rnd)
            people.append((name, token, Simulated(taste, j, kind, seed=seed * 7919 + j)))
    return people


def simulate_round(
    db,
    round_name: str,
    kinds: list[str],
    taste,
    *,
    seed: int = 0,
    limit: int | None = None,
    url: str | None = None,
    turn: int | None = None,
) -> dict:
    """Simulated annotators of `kinds` label the round through the studio's HTTP interface: a
    running studio at `url`, or one started on a free loopback port for the purpose. They take
    turns of `turn` labels (default: about a twentieth of each one's share, 1 to 10), the first to
    go moving on by one each pass, so that (as with people working side by side) each shares items
    with each of the others; `limit` caps each one's labels. Returns {name: labels given}."""
    from contextlib import nullcontext

    from rufus.studio.loop import progress

    people = simulated_people(db, round_name, kinds, taste, seed=seed)
    if turn is None:
        turn = max(1, min(10, progress(db, round_name).wanted // (20 * len(people))))
    done = {name: 0 for name, _, _ in people}
    with nullcontext() if url else LocalServer(db) as running:
        base = url or running.url
        for k in itertools.count():
            given = 0
            for name, token, who in people[k % len(people) :] + people[: k % len(people)]:
                room = turn if limit is None else min(turn, limit - done[name])
                if room > 0:
                    n = label_round(base, round_name, [(name, token, who)], limit=room)[name]
                    done[name] += n
                    given += n
            if given == 0:
                break
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """The studio app served by uvicorn in a background thread on 127.0.0.1 (a context manager)."""

    def __init__(self, db):
        import uvicorn

        from rufus.studio import auth
        from rufus.studio.app import create_app

        self.port = free_port()
        config = uvicorn.Config(
            create_app(db, allowed_hosts=list(auth.LOOPBACK_HOSTS)),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the studio server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
