"""The web app through the ASGI test client: login, sessions, CSRF, Host checks, escaping, blindness,
admin pages, and bad requests that get a clear 4xx and change nothing."""

from __future__ import annotations

import io
import json
import re

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from rufus.studio.app import create_app
from rufus.studio.auth import SESSION_COOKIE
from rufus.studio.db import Label, Round
from rufus.studio.rounds import Candidate, create_round
from tests.studio.conftest import add_people

BASE = "http://127.0.0.1:8765"
XSS_PROMPT = 'Tell me <script>window.__xss=1</script> about "quotes" & things'
XSS_RESPONSE = '<img src=x onerror="window.__xss=2"> and </div><b>bold</b>'
MODELS = ("secret-model-alpha", "secret-model-beta")
RANKED = ("secret-model-gamma", "secret-model-delta", "secret-model-epsilon")  # long: no random token holds them


@pytest.fixture()
def studio(db):
    create_round(
        db,
        "r1",
        "pairwise",
        [
            Candidate(XSS_PROMPT, [XSS_RESPONSE, "plain answer"], list(MODELS)),
            Candidate("second prompt", ["one", "two"], list(MODELS)),
        ],
        labels_per_item=2,
    )
    create_round(db, "<b onclick=x>r2", "ranking", [Candidate("rank these", ["x", "y", "z"], list(RANKED))])
    people = add_people(db, "ann", "bob", admin=True)
    app = create_app(db, login_limit=5, login_window=60)
    return db, app, people


def client(app, token=None):
    c = TestClient(app, base_url=BASE)
    if token:
        r = c.get("/login", params={"token": token}, follow_redirects=False)
        assert r.status_code == 303
    return c


def csrf_of(html):
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def open_item(c, round_name="r1"):
    r = c.get(f"/rounds/{round_name}/next")
    assert r.status_code == 200, r.text
    return int(re.search(r'action="/items/(\d+)"', r.text).group(1)), csrf_of(r.text), r.text


def label_count(db):
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Label))


def test_login_link_starts_a_session_with_safe_cookie(studio):
    _, app, people = studio
    c = TestClient(app, base_url=BASE)
    r = c.get("/login", params={"token": people["ann"][1]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/items/")  # straight to the next item
    cookie = r.headers["set-cookie"].lower()
    assert cookie.startswith(SESSION_COOKIE) and "httponly" in cookie and "samesite=lax" in cookie
    assert people["ann"][1] not in cookie  # the session is not the login token
    assert "ann" in c.get("/").text
    admin = TestClient(app, base_url=BASE).get("/login", params={"token": people["admin"][1]}, follow_redirects=False)
    assert admin.headers["location"] == "/admin"


def test_login_lands_on_the_next_item_or_the_rounds(studio):
    db, app, people = studio
    ann = TestClient(app, base_url=BASE)
    r = ann.get("/login", params={"token": people["ann"][1]}, follow_redirects=False)
    page = ann.get(r.headers["location"])
    assert page.status_code == 200 and 'id="label-form"' in page.text
    from rufus.studio.rounds import set_round_status

    for name in ("r1", "<b onclick=x>r2"):
        set_round_status(db, name, "closed")
    again = TestClient(app, base_url=BASE).get("/login", params={"token": people["ann"][1]}, follow_redirects=False)
    assert again.headers["location"] == "/"  # nothing open: the list of rounds


def test_requests_without_a_valid_token_or_session_are_refused(studio):
    db, app, people = studio
    anon = TestClient(app, base_url=BASE)
    assert anon.get("/rounds/r1/next").status_code == 401
    assert anon.get("/admin").status_code == 401
    assert anon.get("/admin/download/labels.jsonl", headers={"accept": "application/json"}).json()["error"]
    assert anon.post("/items/1", data={"choice": "A"}).status_code == 401
    assert anon.get("/login", params={"token": "not-a-token"}).status_code == 403
    forged = TestClient(app, base_url=BASE, cookies={SESSION_COOKIE: "forged"})
    assert forged.get("/rounds/r1/next").status_code == 401
    ann = client(app, people["ann"][1])
    for path in ("/admin", "/admin/rounds/r1", "/admin/download/labels.csv", "/admin/rounds/r1/export"):
        assert ann.get(path).status_code == 403, path
    assert ann.post("/admin/annotators", data={"name": "eve", "csrf": csrf_of(ann.get("/").text)}).status_code == 403
    assert label_count(db) == 0


def test_login_attempts_are_rate_limited(studio):
    _, app, people = studio
    c = TestClient(app, base_url=BASE)
    assert c.get("/login", params={"token": people["bob"][1]}, follow_redirects=False).status_code == 303
    codes = [c.get("/login", params={"token": f"guess-{i}"}).status_code for i in range(5)]
    assert codes == [403] * 5
    assert c.get("/login", params={"token": people["ann"][1]}).status_code == 429  # even the right one, for now
    assert c.post("/login", data={"token": "guess"}).status_code == 429


def test_forms_without_their_csrf_token_are_refused(studio):
    db, app, people = studio
    ann = client(app, people["ann"][1])
    aid, token, _ = open_item(ann)
    for data in ({"choice": "A"}, {"choice": "A", "csrf": "wrong"}, {"choice": "A", "csrf": token + "x"}):
        r = ann.post(f"/items/{aid}", data=data)
        assert r.status_code == 403 and "CSRF" in r.text
    bob = client(app, people["bob"][1])  # another session's token does not work either
    assert ann.post(f"/items/{aid}", data={"choice": "A", "csrf": csrf_of(bob.get("/").text)}).status_code == 403
    assert ann.post("/undo", data={}).status_code == 403
    assert ann.post("/logout", data={}).status_code == 403
    assert label_count(db) == 0
    r = ann.post(f"/items/{aid}", data={"choice": "A", "csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and label_count(db) == 1
    # the header form of the token works too (scripts)
    aid2, _, _ = open_item(ann)
    r = ann.post(f"/items/{aid2}", data={"choice": "B"}, headers={"x-csrf-token": token}, follow_redirects=False)
    assert r.status_code == 303 and label_count(db) == 2


def test_host_header_must_be_allowed(studio):
    _, app, people = studio
    c = TestClient(app, base_url=BASE)
    assert c.get("/", headers={"host": "attacker.example"}).status_code == 400
    assert c.get("/", headers={"host": "attacker.example:8765"}).status_code == 400
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
        assert c.get("/", headers={"host": host}).status_code == 200
    extra = TestClient(create_app(studio[0], allowed_hosts=["127.0.0.1", "studio.lan"]), base_url="http://studio.lan")
    assert extra.get("/").status_code == 200


def test_security_headers_on_every_response(studio):
    _, app, people = studio
    ann = client(app, people["ann"][1])
    for r in (ann.get("/"), ann.get("/rounds/r1/next"), ann.get("/static/studio.css"), ann.get("/nope")):
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"


def all_pages(app, people):
    """Every page a person sees in a round's life, as (who, html)."""
    ann, bob, admin = (client(app, people[n][1]) for n in ("ann", "bob", "admin"))
    pages = [("ann", ann.get("/").text)]
    for c, who in ((ann, "ann"), (bob, "bob")):
        aid, token, html = open_item(c)
        pages.append((who, html))
        r = c.post(f"/items/{aid}", data={"choice": "Z", "csrf": token})  # error page keeps the item
        assert r.status_code == 400
        pages.append((who, r.text))
        c.post(f"/items/{aid}", data={"choice": "A", "csrf": token})
        pages.append((who, c.get(f"/items/{aid}").text))
    pages.append(("ann", ann.get("/rounds/%3Cb%20onclick%3Dx%3Er2/next").text))
    pages += [
        ("admin", admin.get("/admin").text),
        ("admin", admin.get("/admin/rounds/r1").text),
        ("admin", admin.get("/admin/rounds/%3Cb%20onclick%3Dx%3Er2").text),
    ]
    return pages


def test_model_text_is_escaped_on_every_page(studio):
    _, app, people = studio
    pages = all_pages(app, people)
    for who, html in pages:
        assert "<script>window.__xss" not in html and "<img src=x" not in html and "<b onclick=x>r2" not in html, who
        assert "<b>bold</b>" not in html
    item_pages = [html for who, html in pages if "&lt;script&gt;window.__xss=1" in html]
    assert item_pages and any("&lt;img src=x onerror=&#34;window.__xss=2&#34;&gt;" in html for html in item_pages)
    assert any("&lt;b onclick=x&gt;r2" in html for _, html in pages)


def test_annotator_pages_never_name_a_model(studio):
    _, app, people = studio
    annotator_pages = [html for who, html in all_pages(app, people) if who != "admin"]
    assert len(annotator_pages) >= 6
    for html in annotator_pages:
        for name in MODELS + RANKED:
            assert name not in html
        assert "response_id" not in html and "winner" not in html


def test_bad_requests_get_a_clear_4xx_and_change_nothing(studio):
    db, app, people = studio
    ann = client(app, people["ann"][1])
    aid, token, _ = open_item(ann)
    cases = [
        ("post", "/items/99999", {"choice": "A"}, 404, "no such item"),
        ("post", "/items/abc", {"choice": "A"}, 404, "no such item"),
        ("post", f"/items/{aid}", {}, 400, "choose A, B"),  # malformed: no choice
        ("post", f"/items/{aid}", {"choice": "A", "strength": "enormous"}, 400, "strength"),
        ("post", f"/items/{aid}", {"choice": ["A", "B"]}, 400, "2 times"),
        ("get", "/rounds/nope/next", None, 404, "no round"),
        ("post", "/undo", {}, 409, "no label"),
    ]
    for method, path, data, code, text in cases:
        if method == "post":
            r = ann.post(path, data={**data, "csrf": token}, headers={"accept": "application/json"})
        else:
            r = ann.get(path, headers={"accept": "application/json"})
        assert r.status_code == code, (path, data, r.text)
        assert text.lower() in r.json()["error"].lower()
    assert label_count(db) == 0
    assert ann.post(f"/items/{aid}", data={"choice": "A", "csrf": token}, follow_redirects=False).status_code == 303
    again = ann.post(f"/items/{aid}", data={"choice": "B", "csrf": token})  # a second submission
    assert again.status_code == 409 and "already labelled" in again.text
    bob = client(app, people["bob"][1])
    assert bob.post(f"/items/{aid}", data={"choice": "B", "csrf": csrf_of(bob.get("/").text)}).status_code == 404
    assert bob.get(f"/items/{aid}").status_code == 404  # nor can bob see ann's item
    assert label_count(db) == 1
    with db.session() as s:
        assert s.scalar(select(Label.outcome)) == "win"


def test_a_ranking_that_leaves_a_response_out_is_refused(studio):
    db, app, people = studio
    ann = client(app, people["ann"][1])
    aid, token, html = open_item(ann, "%3Cb%20onclick%3Dx%3Er2")
    assert html.count('<select name="rank_') == 3
    r = ann.post(f"/items/{aid}", data={"rank_A": "1", "rank_B": "2", "csrf": token})
    assert r.status_code == 400 and "response C has no rank" in r.text
    assert 'option value="1" selected' in r.text  # what was entered is kept on the page
    assert label_count(db) == 0
    r = ann.post(
        f"/items/{aid}", data={"rank_A": "1", "rank_B": "1", "rank_C": "3", "csrf": token}, follow_redirects=False
    )
    assert r.status_code == 303 and label_count(db) == 1


def test_a_closed_round_takes_no_labels(studio):
    db, app, people = studio
    ann, admin = client(app, people["ann"][1]), client(app, people["admin"][1])
    aid, token, _ = open_item(ann)
    r = admin.post(
        "/admin/rounds/r1/status",
        data={"status": "closed", "csrf": csrf_of(admin.get("/admin").text)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    r = ann.post(f"/items/{aid}", data={"choice": "A", "csrf": token})
    assert r.status_code == 409 and "closed" in r.text
    assert ann.get("/rounds/r1/next").status_code == 409
    assert label_count(db) == 0
    with db.session() as s:
        assert s.scalar(select(Round.status).where(Round.name == "r1")) == "closed"


def test_skip_and_undo_over_http(studio):
    db, app, people = studio
    ann = client(app, people["ann"][1])
    aid, token, _ = open_item(ann)
    r = ann.post(f"/items/{aid}/skip", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/rounds/r1/next"
    bid, _, _ = open_item(ann)
    assert bid != aid
    ann.post(f"/items/{bid}", data={"choice": "B", "csrf": token})
    r = ann.post("/undo", data={"round": "r1", "csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/items/{bid}" and label_count(db) == 0
    ann.post(f"/items/{bid}", data={"choice": "tie", "csrf": token})
    done = ann.get("/rounds/r1/next")  # both items of r1 are skipped or labelled for ann
    assert "All done" in done.text and label_count(db) == 1


def test_logout_ends_the_session(studio):
    _, app, people = studio
    ann = client(app, people["ann"][1])
    token = csrf_of(ann.get("/").text)
    assert ann.post("/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
    assert ann.get("/rounds/r1/next").status_code == 401


def test_admin_creates_a_round_and_an_annotator_and_exports(studio):
    db, app, people = studio
    admin = client(app, people["admin"][1])
    token = csrf_of(admin.get("/admin").text)
    rows = [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"], "models": ["x", "y"]} for i in range(3)]
    upload = io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())
    r = admin.post(
        "/admin/rounds",
        data={"name": "up", "task": "pairwise", "labels_per_item": "1", "csrf": token},
        files={"file": ("round.jsonl", upload, "application/x-ndjson")},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/admin/rounds/up"
    assert "3 items" in admin.get("/admin/rounds/up").text
    bad = io.BytesIO(b'{"prompt": "p", "responses": ["only one"]}\n')
    r = admin.post(
        "/admin/rounds",
        data={"name": "bad", "task": "pairwise", "csrf": token},
        files={"file": ("bad.jsonl", bad, "application/x-ndjson")},
    )
    assert r.status_code == 400 and "bad.jsonl, line 1" in r.text and "responses" in r.text
    r = admin.post("/admin/annotators", data={"name": "cat", "round": "up", "csrf": token})
    url = re.search(r'id="login-url"[^>]*|value="([^"]+)"', r.text)
    link = re.search(r'value="(http://[^"]+)"', r.text).group(1)
    assert url and link.startswith(BASE + "/login?token=")
    cat = TestClient(app, base_url=BASE)
    assert cat.get(link.removeprefix(BASE), follow_redirects=False).status_code == 303
    aid, ctoken, _ = open_item(cat, "up")
    cat.post(f"/items/{aid}", data={"choice": "A", "csrf": ctoken})
    exported = admin.get("/admin/rounds/up/export", params={"format": "preference"})
    assert exported.status_code == 200 and "attachment" in exported.headers["content-disposition"]
    (row,) = [json.loads(line) for line in exported.text.splitlines()]
    assert row["prompt"].startswith("p") and "chosen_model" not in row
    with_models = admin.get("/admin/rounds/up/export", params={"format": "preference", "with_models": "1"})
    assert json.loads(with_models.text)["chosen_model"] in ("x", "y")
    csv_text = admin.get("/admin/download/labels.csv", params={"round": "up"}).text
    assert csv_text.splitlines()[0].startswith("label_id") and len(csv_text.splitlines()) == 2
    assert admin.get("/admin/download/secrets.csv").status_code == 400


def test_admin_round_page_shows_agreement_and_the_models(studio):
    _, app, people = studio
    pages = dict((who, html) for who, html in all_pages(app, people) if who == "admin")  # labels are in now
    admin = client(app, people["admin"][1])
    html = admin.get("/admin/rounds/r1").text
    assert "Fleiss' kappa: " in html and "Cohen's kappa" in html and "raw agreement: " in html
    assert "secret-model-alpha" in html and "secret-model-beta" in html  # the admin may see the models
    assert pages  # the admin pages rendered on the way too
