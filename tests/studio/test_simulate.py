"""Simulated annotators labelling through the studio's HTTP interface: honest ones prefer the better
playground response, an adversarial one is flagged, a careless one agrees at chance."""

from __future__ import annotations

import random

from rufus.cli import main
from rufus.playground.corpus import make_prompt, make_response
from rufus.studio import export as E
from rufus.studio import rounds as R
from rufus.studio.db import open_database
from rufus.studio.quality import annotator_quality
from rufus.studio.simulate import Browser, LocalServer


def playground_round(db, name: str, n: int, task: str = "pairwise") -> None:
    """n playground prompts, each with a good response (on topic, polite, answering) and a bad one."""
    rng = random.Random(0)
    cands = []
    for _ in range(n):
        info = make_prompt(rng)
        good = make_response(info, rng)
        bad = make_response(info, rng, on_topic=False, polite=False, answers=False)
        extra = [make_response(info, rng, polite=False)] if task == "ranking" else []
        cands.append(
            R.Candidate(info["prompt"], [good, bad] + extra, ["good", "bad"] + (["middling"] if extra else []))
        )
    R.create_round(db, name, task, cands, labels_per_item=3)


def test_simulated_annotators_label_over_http(tmp_path, capsys):
    path = tmp_path / "s.db"
    db, _ = open_database(path)
    playground_round(db, "r", 16)
    db.dispose()
    assert (
        main(
            [
                "studio",
                "simulate",
                "--db",
                str(path),
                "--round",
                "r",
                "--annotators",
                "2",
                "--adversarial",
                "1",
                "--temperature",
                "0.2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "sim-1 gave 16 labels" in out and "adversarial-1 gave 16 labels" in out
    db, _ = open_database(path)
    rows = E.export_rows(db, "r", "preference", with_models=True)
    by = {}
    for r in rows:
        by.setdefault(r["annotator_id"], []).append(r["chosen_model"] == "good")
    shares = sorted(sum(v) / len(v) for v in by.values())
    assert len(shares) == 3 and shares[0] < 0.25 and shares[1] > 0.75  # the adversary, then the honest two
    quality = {q.annotator: q for q in annotator_quality(db, "r")}
    assert any(f.startswith("below chance") for f in quality["adversarial-1"].flags)
    assert not any(f.startswith("below chance") for f in quality["sim-1"].flags)
    db.dispose()


def test_simulated_rankings_and_the_page_reader(db):
    playground_round(db, "k", 4, task="ranking")
    from rufus.playground.taste import Annotators
    from rufus.studio import auth
    from rufus.studio.simulate import Simulated, label_round

    with db.session() as s:
        user, token = auth.create_user(s, "reader")
    with LocalServer(db) as server:
        browser = Browser(server.url)
        browser.open(f"/login?token={token}")
        page = browser.open("/rounds/k/next")
        assert page.task == "ranking" and page.csrf and page.action.startswith("/items/")
        assert sorted(page.responses) == ["A", "B", "C"] and all(t.strip() for t in page.responses.values())
        assert len(page.prompt) == 1 and page.prompt[0].strip()  # one user turn, read back as text
        taste = Annotators("default", n=1, temperature=0.0, seed=0)
        done = label_round(server.url, "k", [("reader", token, Simulated(taste, 0, "honest", seed=1))])
    assert done == {"reader": 4}
    rows = E.export_rows(db, "k", "ranking", with_models=True)
    assert len(rows) == 4 and all(r["models"][0] == "good" and r["models"][-1] == "bad" for r in rows)
