"""Who may do what in the studio: login tokens, sessions, CSRF tokens, login rate limits, Host checks.

- Login tokens are 256-bit random strings (`secrets.token_urlsafe(32)`); the database keeps only
  their SHA-256. A person's login URL carries the token once; opening it starts a session and
  redirects to a URL without it.
- A session is a random cookie value (HttpOnly, SameSite=Lax, Secure when the studio is served
  over https); the database keeps its hash and the session's CSRF token, which every form carries
  as a hidden field and every state-changing request must return (the synchronizer-token pattern,
  OWASP CSRF cheat sheet). SameSite=Lax rather than Strict so that a login link opened from a mail
  or chat keeps its session through the redirect.
- Login attempts are limited per client address (`RateLimiter`): a guessing loop gets 429s long
  before it could matter (and tokens are not guessable anyway).
- `host_allowed` checks the Host header against an allowlist, so a page on another site that has
  made its own name resolve to 127.0.0.1 (DNS rebinding) cannot reach the studio.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rufus.studio.db import SessionRow, StudioError, User, get_meta, log_event, set_meta

SESSION_COOKIE = "rufus_studio_session"
SESSION_SECONDS = 14 * 24 * 3600
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time string comparison."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# --- people -------------------------------------------------------------------------------------


def create_user(s: Session, name: str, role: str = "annotator") -> tuple[User, str]:
    """A new user and their login token (shown once; only its hash is stored)."""
    name = name.strip()
    if not name:
        raise StudioError("an annotator needs a non-empty name")
    if len(name) > 200:
        raise StudioError("names are at most 200 characters")
    if role not in ("admin", "annotator"):
        raise StudioError(f"role must be admin or annotator, not {role!r}")
    if s.scalar(select(User).where(User.name == name)) is not None:
        raise StudioError(f"there is already a user named {name!r}")
    token = new_token()
    user = User(name=name, role=role, token_hash=token_hash(token), active=True, created_at=time.time())
    s.add(user)
    s.flush()
    log_event(s, "user_created", user.id, name=name, role=role)
    return user, token


def ensure_admin(s: Session) -> str | None:
    """Create the admin on first use; return their token then (to print once), else None."""
    if get_meta(s, "admin_created") is not None:
        return None
    existing = s.scalar(select(User).where(User.name == "admin"))
    if existing is not None:  # a user took the name; the admin becomes "admin-1", ...
        name = next(
            f"admin-{i}" for i in range(1, 10**6) if s.scalar(select(User).where(User.name == f"admin-{i}")) is None
        )
    else:
        name = "admin"
    _, token = create_user(s, name, role="admin")
    set_meta(s, "admin_created", str(time.time()))
    return token


def rotate_token(s: Session, name: str) -> str:
    """A fresh login token for `name` (the old one stops working, and so do their sessions)."""
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        raise StudioError(f"no user named {name!r}")
    token = new_token()
    user.token_hash = token_hash(token)
    s.execute(delete(SessionRow).where(SessionRow.user_id == user.id))
    log_event(s, "token_rotated", user.id)
    return token


def user_for_token(s: Session, token: str) -> User | None:
    if not token or len(token) > 200:
        return None
    user = s.scalar(select(User).where(User.token_hash == token_hash(token)))
    return user if user is not None and user.active else None


# --- sessions -----------------------------------------------------------------------------------


def start_session(s: Session, user: User) -> str:
    """A new session for `user`; returns the cookie value (the database keeps its hash)."""
    value = new_token()
    now = time.time()
    s.add(
        SessionRow(
            id_hash=token_hash(value),
            user_id=user.id,
            csrf=new_token(),
            created_at=now,
            expires_at=now + SESSION_SECONDS,
        )
    )
    s.execute(delete(SessionRow).where(SessionRow.expires_at < now))  # keep the table small
    log_event(s, "login", user.id)
    return value


def load_session(s: Session, cookie: str | None) -> tuple[User, SessionRow] | None:
    """The (user, session) of a cookie value, or None if it is missing, unknown, expired or the
    user was deactivated."""
    if not cookie or len(cookie) > 200:
        return None
    row = s.get(SessionRow, token_hash(cookie))
    if row is None or row.expires_at < time.time():
        return None
    user = s.get(User, row.user_id)
    if user is None or not user.active:
        return None
    return user, row


def end_session(s: Session, cookie: str | None) -> None:
    if cookie:
        s.execute(delete(SessionRow).where(SessionRow.id_hash == token_hash(cookie)))


# --- rate limits and hosts ----------------------------------------------------------------------


class RateLimiter:
    """At most `limit` failures per `window` seconds per key (a sliding window, in memory): `allow`
    says whether another attempt may be made, `fail` counts one that failed."""

    def __init__(self, limit: int = 20, window: float = 60.0):
        self.limit, self.window = limit, window
        self._events: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque:
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        return events

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            return len(self._recent(key, now)) < self.limit

    def fail(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recent(key, now).append(now)
            if len(self._events) > 10_000:  # forget idle keys
                for k in [k for k, v in self._events.items() if not v]:
                    del self._events[k]


def split_host(header: str) -> str:
    """The host name of a Host header, without the port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The Host names the server answers to: loopback names, the bound address (unless it is a
    wildcard), and the `extra` names the admin lists."""
    hosts = list(LOOPBACK_HOSTS)
    if bind_host not in ("0.0.0.0", "::", ""):
        hosts.append(bind_host.lower())
    hosts += [h.lower() for h in extra]
    return list(dict.fromkeys(hosts))


def host_allowed(header: str | None, allowed: list[str]) -> bool:
    if not header:
        return False
    return "*" in allowed or split_host(header) in allowed


def csrf_ok(session: SessionRow, submitted: str | None) -> bool:
    return bool(submitted) and same(session.csrf, submitted)
