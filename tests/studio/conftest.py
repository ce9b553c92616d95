"""Fixtures for the studio tests: a fresh database, people with tokens, a small round."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from rufus.studio import auth
from rufus.studio.db import User, open_database
from rufus.studio.rounds import Candidate, create_round

POSTGRES = os.environ.get("RUFUS_TEST_POSTGRES_URL")  # e.g. postgresql+psycopg://studio:studio@127.0.0.1/studio_test


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh studio database: an SQLite file, and the same tests again on PostgreSQL where
    RUFUS_TEST_POSTGRES_URL names an empty database the tests may fill and clear (.ci/run starts one)."""
    if request.param == "sqlite":
        database, created = open_database(tmp_path / "studio.db")
    else:
        if not POSTGRES:
            pytest.skip("PostgreSQL: set RUFUS_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@127.0.0.1/db to run")
        _clear_postgres(POSTGRES)
        database, created = open_database(POSTGRES)
    assert created
    yield database
    database.dispose()


def _clear_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture()
def sqlite_db(tmp_path):
    database, _ = open_database(tmp_path / "studio.db")
    yield database
    database.dispose()


def add_people(db, *names, admin=False):
    """{name: (user id, token)}; with admin=True also the admin as "admin"."""
    out = {}
    with db.session() as s:
        if admin:
            token = auth.ensure_admin(s)
            out["admin"] = (s.scalar(select(User.id).where(User.name == "admin")), token)
        for name in names:
            user, token = auth.create_user(s, name)
            out[name] = (user.id, token)
    return out


def pairwise_candidates(n: int = 4) -> list[Candidate]:
    """n prompts, each answered by two models with different texts."""
    return [
        Candidate(f"prompt {i}", [f"answer {i} from m1", f"answer {i} from m2"], ["model-one", "model-two"])
        for i in range(n)
    ]


@pytest.fixture()
def pairwise_round(db):
    create_round(db, "r1", "pairwise", pairwise_candidates(4), labels_per_item=2)
    return "r1"
