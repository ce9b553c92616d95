"""The studio's web app: an ASGI application (Starlette) of server-rendered pages (Jinja2).

Annotator pages: `/` (their rounds and progress), `/rounds/{name}/next` (claims the next item and
redirects to it), `/items/{id}` (the item; POST = the label), `/items/{id}/skip`, `/undo`.
Admin pages under `/admin`: rounds, progress, per-annotator counts and median time per label, label
distribution, most-disputed items, new rounds from an uploaded file, new annotators, open / close,
exports in the training formats and downloads of every table.

Security, in the order a request meets it (see `rufus.studio.auth` for the pieces):
1. the Host header must be on the allowlist (DNS rebinding), else 400;
2. every response carries a strict Content-Security-Policy (scripts and styles only from /static,
   no inline script), no-referrer, nosniff and frame-deny headers;
3. a page needs a session cookie; admin pages need an admin's;
4. every POST must carry the session's CSRF token (form field `csrf`, or header X-CSRF-Token), else
   403 and nothing changes;
5. all text is escaped by Jinja2's autoescaping (model text is untrusted input), and no page an
   annotator can reach names a model or a response id.

Errors: a request the studio cannot honour gets a 4xx page that says why (or JSON {"error": ...}
when the client asks for JSON) and changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rufus.studio import auth
from rufus.studio import rounds as R
from rufus.studio.db import Database, Round, StudioError, User

log = logging.getLogger(__name__)

MAX_UPLOAD = 64 * 1024 * 1024  # a round file uploaded by the admin
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


STATUS = {R.LabelError: 400, R.Conflict: 409, R.NotFound: 404}


def _status(e: StudioError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(e, cls)), 400)


class Guard:
    """Pure ASGI middleware: the Host allowlist, then security headers on every response."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if not auth.host_allowed(host, self.allowed):
            body = (
                f"Host {host!r} is not allowed here. Open the studio by an allowed name "
                f"({', '.join(self.allowed)}), or start it with --allowed-hosts NAME."
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ]
                    + SECURITY_HEADERS,
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _prompt_turns(prompt: Any) -> list[dict[str, str]]:
    """A prompt as turns for display: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in prompt]


def _response_text(content: Any) -> str:
    """A response as shown: its text (turns joined), without the leading and trailing blank space
    that tokenizers often leave (the stored text is unchanged)."""
    if isinstance(content, str):
        return content.strip()
    return "\n\n".join(str(m.get("content", "")) for m in content).strip()


def create_app(
    db: Database,
    *,
    allowed_hosts: list[str] | None = None,
    secure_cookies: bool = False,
    login_limit: int = 20,
    login_window: float = 60.0,
) -> Starlette:
    """The studio as an ASGI app over an opened database."""
    env = Environment(
        loader=PackageLoader("rufus.studio", "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["turns"] = _prompt_turns
    env.filters["response_text"] = _response_text
    env.filters["quote"] = lambda s: quote(str(s), safe="")
    limiter = auth.RateLimiter(login_limit, login_window)
    allowed = allowed_hosts or list(auth.LOOPBACK_HOSTS)

    # --- helpers ---------------------------------------------------------------------------------

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    def page(template: str, code: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**context), status_code=code)

    def error_page(request: Request, status: int, message: str, who=None) -> Response:
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        return page("error.html", status, message=message, status=status, me=who)

    def current(request: Request) -> tuple[User, Any] | None:
        with db.read() as s:
            found = auth.load_session(s, request.cookies.get(auth.SESSION_COOKIE))
            if found is None:
                return None
            user, sess = found
            s.expunge(user)
            s.expunge(sess)
            return user, sess

    def need(request: Request, admin: bool = False):
        found = current(request)
        if found is None:
            raise HTTPError(401, "You are not logged in. Open the login link you were given.")
        if admin and found[0].role != "admin":
            raise HTTPError(403, "This page is for the studio's admins.")
        return found

    async def read_form(request: Request, sess, *, upload: bool = False) -> dict[str, Any]:
        """The form as {field: str or [str, ...] for repeated fields}; checks the CSRF token."""
        try:
            form = await request.form(max_part_size=MAX_UPLOAD if upload else 1024 * 1024, max_files=1 if upload else 0)
        except Exception as e:  # malformed multipart, too large, ...
            raise HTTPError(400, f"could not read the form: {e}") from None
        out: dict[str, Any] = {}
        for key in form.keys():
            values = form.getlist(key)
            out[key] = values if len(values) > 1 or key == "flag" else values[0]
        token = out.get("csrf") or request.headers.get("x-csrf-token")
        if not isinstance(token, str) or not auth.csrf_ok(sess, token):
            raise HTTPError(
                403,
                "This form has expired or did not come from the studio (missing or wrong CSRF "
                "token). Reload the page and try again.",
            )
        return out

    def endpoint(fn):
        """Run `fn(request)` (sync) in the thread pool, turning errors into 4xx pages."""

        async def run(request: Request) -> Response:
            try:
                form_needed = getattr(fn, "form", None)
                if form_needed is not None:
                    found = await run_in_threadpool(need, request, form_needed == "admin")
                    request.state.auth = found
                    request.state.form = await read_form(request, found[1], upload=getattr(fn, "upload", False))
                return await run_in_threadpool(fn, request)
            except HTTPError as e:
                if e.status == 401 and not wants_json(request) and request.method == "GET":
                    return page("login.html", 401, message=e.message, me=None)
                return error_page(request, e.status, e.message)
            except StudioError as e:
                return error_page(request, _status(e), str(e))

        return run

    def posts(kind: str = "user", upload: bool = False):
        def mark(fn):
            fn.form, fn.upload = kind, upload
            return fn

        return mark

    def redirect(url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303)

    # --- login -----------------------------------------------------------------------------------

    def _login(request: Request, token: str) -> Response:
        client = request.client.host if request.client else "?"
        if not limiter.allow(client):
            raise HTTPError(429, "Too many login attempts from here; wait a minute and try again.")
        with db.session() as s:
            user = auth.user_for_token(s, token)
            if user is None:
                limiter.fail(client)
                raise HTTPError(
                    403,
                    "This login link is not valid (mistyped, or replaced by a newer one). "
                    "Ask the studio's admin for yours.",
                )
            cookie = auth.start_session(s, user)
            user_id, is_admin = user.id, user.role == "admin"
        response = redirect("/admin" if is_admin else _first_item(user_id))
        response.set_cookie(
            auth.SESSION_COOKIE,
            cookie,
            max_age=auth.SESSION_SECONDS,
            httponly=True,
            samesite="lax",
            secure=secure_cookies,
            path="/",
        )
        return response

    def _first_item(user_id: int) -> str:
        """Where an annotator's login link lands: their next item in the first open round that has one
        for them, else their rounds."""
        with db.read() as s:
            user = s.get(User, user_id)
            names = [r.name for r in R.rounds_for(s, user) if r.status == "open"]
        for name in names:
            aid = R.next_assignment(db, user_id, name)
            if aid is not None:
                return f"/items/{aid}"
        return "/"

    def login_get(request: Request) -> Response:
        token = request.query_params.get("token")
        if token:
            return _login(request, token)
        return page("login.html", me=None, message=None)

    async def login_post(request: Request) -> Response:
        try:
            form = await request.form(max_part_size=4096, max_files=0)
        except Exception:
            return error_page(request, 400, "could not read the login form")
        token = form.get("token")
        try:
            return await run_in_threadpool(_login, request, token if isinstance(token, str) else "")
        except HTTPError as e:
            return error_page(request, e.status, e.message)

    @posts()
    def logout(request: Request) -> Response:
        with db.session() as s:
            auth.end_session(s, request.cookies.get(auth.SESSION_COOKIE))
        response = redirect("/login")
        response.delete_cookie(auth.SESSION_COOKIE, path="/")
        return response

    # --- annotators --------------------------------------------------------------------------------

    def home(request: Request) -> Response:
        found = current(request)
        if found is None:
            return page("login.html", me=None, message=None)
        user, sess = found
        with db.read() as s:
            rows = []
            for rnd in R.rounds_for(s, user):
                mine = R.user_progress(s, user, rnd)
                prog = R.round_progress(s, rnd)
                rows.append(
                    {
                        "name": rnd.name,
                        "task": rnd.task,
                        "status": rnd.status,
                        "mine": mine["labelled"],
                        "fraction": prog["fraction"],
                        "items": prog["items"],
                    }
                )
        return page("home.html", me=user, csrf=sess.csrf, rounds=rows)

    def next_item(request: Request) -> Response:
        user, sess = need(request)
        name = request.path_params["name"]
        aid = R.next_assignment(db, user.id, name)
        if aid is None:
            with db.read() as s:
                done = R.user_progress(s, user, R.get_round(s, name))["labelled"]
            return page("done.html", me=user, csrf=sess.csrf, round_name=name, labelled=done)
        return redirect(f"/items/{aid}")

    def _item_page(user, sess, aid: int, status: int = 200, error: str | None = None, form=None) -> Response:
        view = R.view_assignment(db, user.id, aid)
        return page(
            "item.html",
            status,
            me=user,
            csrf=sess.csrf,
            item=view,
            labelled=view.labelled,
            error=error,
            form=form or {},
            flags=R.FLAGS,
            scale=list(range(R.RATING_SCALE[0], R.RATING_SCALE[1] + 1)),
        )

    def item_get(request: Request) -> Response:
        user, sess = need(request)
        return _item_page(user, sess, _int(request.path_params["aid"]))

    @posts()
    def item_post(request: Request) -> Response:
        user, sess = request.state.auth
        aid = _int(request.path_params["aid"])
        form = request.state.form
        try:
            done = R.submit_label(db, user.id, aid, form)
        except R.LabelError as e:
            if wants_json(request):
                raise
            return _item_page(user, sess, aid, 400, str(e), form)
        following = f"/rounds/{quote(done.round_name, safe='')}/next"
        if wants_json(request):
            return JSONResponse({"ok": True, "label": done.label_id, "next": following})
        return redirect(following)

    @posts()
    def item_skip(request: Request) -> Response:
        user, _ = request.state.auth
        aid = _int(request.path_params["aid"])
        name = R.skip(db, user.id, aid)
        return redirect(f"/rounds/{quote(name, safe='')}/next")

    @posts()
    def undo(request: Request) -> Response:
        user, _ = request.state.auth
        name = request.state.form.get("round")
        aid = R.undo_last(db, user.id, name if isinstance(name, str) and name else None)
        return redirect(f"/items/{aid}")

    # --- admin -----------------------------------------------------------------------------------

    def admin_home(request: Request) -> Response:
        user, sess = need(request, admin=True)
        with db.read() as s:
            from sqlalchemy import select

            rounds = [R.round_progress(s, r) for r in s.scalars(select(Round).order_by(Round.created_at, Round.id))]
            people = [
                {"name": u.name, "role": u.role, "active": u.active} for u in s.scalars(select(User).order_by(User.id))
            ]
        return page(
            "admin.html",
            me=user,
            csrf=sess.csrf,
            rounds=rounds,
            people=people,
            tasks=("pairwise", "ranking", "rating"),
            created=None,
        )

    def admin_round(request: Request) -> Response:
        from rufus.studio.export import FORMATS as export_formats
        from rufus.studio.leaderboard import LeaderboardError, leaderboard
        from rufus.studio.quality import annotator_quality
        from rufus.studio.stats import disputed_items, label_distribution, round_agreement, round_comparisons

        user, sess = need(request, admin=True)
        name = request.path_params["name"]
        with db.read() as s:
            rnd = R.get_round(s, name)
            prog = R.round_progress(s, rnd)
        board, board_note = [], None
        comparisons = round_comparisons(db, [name])
        if comparisons:
            try:  # a light prior keeps an unbeaten model finite while few labels are in
                board = leaderboard(comparisons, resamples=200, seed=0, prior=0.01)
            except LeaderboardError as e:
                board_note = str(e)
        return page(
            "admin_round.html",
            me=user,
            csrf=sess.csrf,
            p=prog,
            dist=label_distribution(db, name),
            disputed=disputed_items(db, name, limit=10),
            formats=export_formats,
            tables=("labels", "items", "responses", "annotators"),
            agreement=round_agreement(db, name),
            quality={q.annotator: q for q in annotator_quality(db, name)},
            board=board,
            board_note=board_note,
            comparisons=len(comparisons),
        )

    @posts("admin", upload=True)
    def admin_new_round(request: Request) -> Response:
        from rufus.studio.files import candidates_from_upload

        form = request.state.form
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            raise HTTPError(400, "choose a responses file (.jsonl rows with prompt and responses) to upload")
        data = upload.file.read()
        cands = candidates_from_upload(data, getattr(upload, "filename", "upload.jsonl") or "upload.jsonl")
        try:
            lpi = int(form.get("labels_per_item") or 1)
        except ValueError:
            raise HTTPError(400, "labels per item must be a whole number") from None
        R.create_round(
            db,
            str(form.get("name") or ""),
            str(form.get("task") or ""),
            cands,
            labels_per_item=lpi,
            pairs=str(form.get("pairs") or "all"),
            instructions=str(form.get("instructions") or ""),
            source={"upload": getattr(upload, "filename", None)},
        )
        return redirect(f"/admin/rounds/{quote(str(form.get('name')).strip(), safe='')}")

    @posts("admin")
    def admin_new_annotator(request: Request) -> Response:
        user, sess = request.state.auth
        form = request.state.form
        name = str(form.get("name") or "")
        round_name = str(form.get("round") or "")
        with db.session() as s:
            new, token = auth.create_user(s, name, role="admin" if form.get("role") == "admin" else "annotator")
            if round_name:
                R.add_member(s, new, R.get_round(s, round_name))
        base = str(request.base_url).rstrip("/")
        return page("annotator_created.html", me=user, csrf=sess.csrf, name=new.name, url=f"{base}/login?token={token}")

    @posts("admin")
    def admin_exclude(request: Request) -> Response:
        from rufus.studio.quality import exclude, include

        form = request.state.form
        name = request.path_params["name"]
        who = str(form.get("annotator") or "")
        if form.get("action") == "include":
            include(db, name, who)
        else:
            exclude(db, name, who, str(form.get("reason") or "excluded on the admin page"))
        return redirect(f"/admin/rounds/{quote(name, safe='')}")

    @posts("admin")
    def admin_round_status(request: Request) -> Response:
        status = request.state.form.get("status")
        name = request.path_params["name"]
        R.set_round_status(db, name, str(status))
        return redirect(f"/admin/rounds/{quote(name, safe='')}")

    def admin_export(request: Request) -> Response:
        from rufus.studio.export import export_rows, to_jsonl

        need(request, admin=True)
        q = request.query_params
        name = request.path_params["name"]
        fmt = q.get("format", "preference")
        rows = export_rows(
            db,
            name,
            fmt,
            tie=q.get("tie", "drop"),
            aggregate=q.get("aggregate", "label"),
            with_models=q.get("with_models") in ("1", "true", "on"),
            scale=q.get("scale", "unit"),
        )
        return _download(to_jsonl(rows), f"{name}-{fmt}.jsonl", "application/x-ndjson")

    def admin_download(request: Request) -> Response:
        from rufus.studio.export import table_rows, to_csv, to_jsonl

        need(request, admin=True)
        table, ext = request.path_params["table"], request.path_params["ext"]
        if ext not in ("jsonl", "csv"):
            raise HTTPError(404, "downloads are .jsonl or .csv")
        round_name = request.query_params.get("round") or None
        rows = table_rows(db, table, round_name)
        stem = f"{round_name}-{table}" if round_name else table
        if ext == "csv":
            return _download(to_csv(rows), f"{stem}.csv", "text/csv; charset=utf-8")
        return _download(to_jsonl(rows), f"{stem}.jsonl", "application/x-ndjson")

    def not_found(request: Request, exc=None) -> Response:
        return error_page(request, 404, "There is no such page.")

    def wrap(fn):
        return endpoint(fn)

    routes = [
        Route("/", wrap(home)),
        Route("/login", wrap(login_get), methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", wrap(logout), methods=["POST"]),
        Route("/rounds/{name}/next", wrap(next_item)),
        Route("/items/{aid}", wrap(item_get), methods=["GET"]),
        Route("/items/{aid}", wrap(item_post), methods=["POST"]),
        Route("/items/{aid}/skip", wrap(item_skip), methods=["POST"]),
        Route("/undo", wrap(undo), methods=["POST"]),
        Route("/admin", wrap(admin_home)),
        Route("/admin/rounds", wrap(admin_new_round), methods=["POST"]),
        Route("/admin/rounds/{name}", wrap(admin_round)),
        Route("/admin/rounds/{name}/status", wrap(admin_round_status), methods=["POST"]),
        Route("/admin/rounds/{name}/exclude", wrap(admin_exclude), methods=["POST"]),
        Route("/admin/rounds/{name}/export", wrap(admin_export)),
        Route("/admin/annotators", wrap(admin_new_annotator), methods=["POST"]),
        Route("/admin/download/{table}.{ext}", wrap(admin_download)),
        Mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: _method_not_allowed})
    app.state.db = db
    return Guard(app, allowed)


def _method_not_allowed(request: Request, exc=None) -> Response:
    return (
        JSONResponse({"error": f"{request.method} is not allowed here"}, status_code=405)
        if "application/json" in request.headers.get("accept", "")
        else HTMLResponse(f"<p>{request.method} is not allowed here.</p>", status_code=405)
    )


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HTTPError(404, "There is no such item.") from None
    if value < 0 or value > 2**62:
        raise HTTPError(404, "There is no such item.")
    return value


def _download(text: str, filename: str, media_type: str) -> Response:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in filename)
    return Response(text, media_type=media_type, headers={"content-disposition": f'attachment; filename="{safe}"'})
