"""The studio database: schema creation, versions and upgrades, SQLite durability settings, hashed tokens."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
from sqlalchemy import inspect, select, text

from rufus.studio import auth
from rufus.studio import db as studio_db
from rufus.studio.db import Meta, StudioError, User, open_database


def test_new_database_has_the_schema_and_its_version(tmp_path):
    database, created = open_database(tmp_path / "s.db")
    assert created
    tables = set(inspect(database.engine).get_table_names())
    assert {
        "meta",
        "users",
        "rounds",
        "prompts",
        "responses",
        "items",
        "assignments",
        "labels",
        "sessions",
        "events",
        "round_members",
    } <= tables
    with database.session() as s:
        assert s.get(Meta, "schema_version").value == str(studio_db.SCHEMA_VERSION)
    database.dispose()
    again, created = open_database(tmp_path / "s.db")
    assert not created
    again.dispose()


def test_sqlite_runs_wal_with_full_sync_and_foreign_keys(sqlite_db):
    with sqlite_db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar().lower() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_a_newer_schema_is_refused(tmp_path):
    database, _ = open_database(tmp_path / "s.db")
    with database.session() as s:
        s.get(Meta, "schema_version").value = str(studio_db.SCHEMA_VERSION + 1)
    database.dispose()
    with pytest.raises(StudioError, match="newer Rufus"):
        open_database(tmp_path / "s.db")


def test_an_older_schema_is_upgraded_step_by_step(tmp_path, monkeypatch):
    database, _ = open_database(tmp_path / "s.db")
    database.dispose()
    calls = []

    def step(conn):  # what a real version 2 would do: add a column
        calls.append("1->2")
        conn.execute(text("ALTER TABLE rounds ADD COLUMN colour VARCHAR(16)"))

    monkeypatch.setattr(studio_db, "SCHEMA_VERSION", studio_db.SCHEMA_VERSION + 1)
    monkeypatch.setitem(studio_db.UPGRADES, studio_db.SCHEMA_VERSION - 1, step)
    upgraded, created = open_database(tmp_path / "s.db")
    assert not created and calls == ["1->2"]
    assert "colour" in {c["name"] for c in inspect(upgraded.engine).get_columns("rounds")}
    with upgraded.session() as s:
        assert s.get(Meta, "schema_version").value == str(studio_db.SCHEMA_VERSION)
    upgraded.dispose()
    again, _ = open_database(tmp_path / "s.db")  # already current: the step does not run twice
    assert calls == ["1->2"]
    again.dispose()


def test_a_database_of_something_else_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StudioError, match="not a Rufus studio"):
        open_database(path)


def test_missing_database_is_an_error_when_not_creating(tmp_path):
    with pytest.raises(StudioError, match="no studio database"):
        open_database(tmp_path / "nothing.db", create=False)


def test_tokens_are_stored_only_as_hashes(db):
    with db.session() as s:
        admin_token = auth.ensure_admin(s)
        assert auth.ensure_admin(s) is None  # printed once
        user, token = auth.create_user(s, "ann")
    with db.engine.connect() as conn:  # what is on disk, read past the ORM
        stored = {h for (h,) in conn.execute(text("SELECT token_hash FROM users"))}
    for t in (admin_token, token):
        assert t not in stored and hashlib.sha256(t.encode()).hexdigest() in stored
    with db.session() as s:
        assert auth.user_for_token(s, token).name == "ann"
        assert auth.user_for_token(s, token + "x") is None
        new = auth.rotate_token(s, "ann")
    with db.session() as s:
        assert auth.user_for_token(s, token) is None and auth.user_for_token(s, new).name == "ann"
        assert s.scalar(select(User.role).where(User.name == "admin")) == "admin"


def test_user_names_are_unique_and_checked(db):
    with db.session() as s:
        auth.create_user(s, "ann")
    with pytest.raises(StudioError, match="already a user"), db.session() as s:
        auth.create_user(s, "ann")
    with pytest.raises(StudioError, match="non-empty"), db.session() as s:
        auth.create_user(s, "  ")


def test_host_header_parsing_and_allowlist():
    allowed = auth.allowed_hosts("127.0.0.1", ["studio.example"])
    assert auth.split_host("[::1]:8765") == "::1" and auth.split_host("LocalHost:80") == "localhost"
    assert auth.host_allowed("127.0.0.1:8765", allowed) and auth.host_allowed("[::1]:1", allowed)
    assert auth.host_allowed("studio.example", allowed)
    assert not auth.host_allowed("evil.example:8765", allowed) and not auth.host_allowed(None, allowed)
    assert "0.0.0.0" not in auth.allowed_hosts("0.0.0.0")


def test_rate_limiter_counts_failures_within_its_window():
    limiter = auth.RateLimiter(limit=3, window=10.0)
    for t in (0, 1, 2):
        assert limiter.allow("a", now=t)
        limiter.fail("a", now=t)
    assert not limiter.allow("a", now=3)
    assert limiter.allow("b", now=3)  # per key
    assert limiter.allow("a", now=10.5)  # the first failure has left the window
