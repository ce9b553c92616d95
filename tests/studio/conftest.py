"""Fixtures for the studio tests: a fresh database, people with tokens, a small round."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from rufus.studio import auth
from rufus.studio.db import User, open_database
from rufus.studio.rounds import Candidate, create_round


@pytest.fixture()
def db(tmp_path):
    database, created = open_database(tmp_path / "studio.db")
    assert created
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
    return [Candidate(f"prompt {i}", [f"answer {i} from m1", f"answer {i} from m2"], ["model-one", "model-two"])
            for i in range(n)]


@pytest.fixture()
def pairwise_round(db):
    create_round(db, "r1", "pairwise", pairwise_candidates(4), labels_per_item=2)
    return "r1"
