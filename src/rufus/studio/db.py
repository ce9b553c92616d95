"""The studio's database: SQLAlchemy 2 models, an explicit schema version, and how to open one.

A studio is one database: an SQLite file by default (`studio.db`, WAL journal, `synchronous=FULL`,
so a label whose commit returned survives a kill -9 of the server and a power cut), or any
SQLAlchemy URL (e.g. ``postgresql+psycopg://user@host/studio``) for a team server.

What is stored, and why it is shaped this way:

``users``        people: ``role`` admin or annotator; only a SHA-256 hash of each login token is kept
                 (the tokens are 256-bit random, so a fast hash is enough: nothing to brute-force).
``rounds``       a labelling round: its task (pairwise | ranking | rating), how many independent labels
                 each item gets, open or closed.
``round_members``which rounds an annotator works on; an annotator with no memberships works on all.
``prompts``      a round's prompts, as given (a string or a message list, kept as JSON).
``responses``    the candidate responses to a prompt, with the model that wrote each (never shown to
                 annotators) and the sample index.
``items``        what one label is about: a prompt and 2 (pairwise) or K (ranking, rating) of its
                 responses.
``assignments``  an item handed to an annotator, with the order the responses were shown in (random,
                 per annotator, stored so a label maps back and position bias can be measured).
                 (item, user) is unique: nobody gets the same item twice.
``labels``       one per assignment (unique): the outcome in terms of response ids, never of screen
                 positions; the optional better answer, comment and flags; how long it took.
``sessions``     browser sessions (a hash of the cookie value) with their CSRF token.
``exclusions``   annotators an admin left out of a round (exports, agreement and leaderboard skip
                 their labels).
``events``       an append-only log of what happened (labels, skips, undos, logins), for audit.

Schema versions: ``meta.schema_version`` holds the version a database was written by. Opening an
older one runs the steps in `UPGRADES` in order, inside one transaction; opening a newer one is an
error (a newer Rufus wrote it). A new version adds a step ``UPGRADES[n] = fn(connection)`` taking
version n to n + 1 and bumps `SCHEMA_VERSION`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SCHEMA_VERSION = 2


def _v1_to_v2(conn: Connection) -> None:
    """Version 2: gold items (items.gold) and per-round exclusions of annotators."""
    conn.execute(text("ALTER TABLE items ADD COLUMN gold JSON"))
    Exclusion.__table__.create(conn)


# version n -> a function taking a database at version n to n + 1 (see the module docstring);
# filled in below the models they refer to
UPGRADES: dict[int, Callable[[Connection], None]] = {}

TASKS = ("pairwise", "ranking", "rating")
ROLES = ("admin", "annotator")


class StudioError(ValueError):
    """A problem with the studio's input or state, phrased for the person who caused it."""


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | annotator
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task: Mapped[str] = mapped_column(String(16))  # pairwise | ranking | rating
    labels_per_item: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | closed
    instructions: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[dict[str, Any]] = mapped_column(default=dict)  # where the responses came from
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class RoundMember(Base):
    __tablename__ = "round_members"
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # row of the source file
    content: Mapped[Any] = mapped_column(JSON)  # str or a message list
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)  # other columns of the source row


class Response(Base):
    __tablename__ = "responses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    content: Mapped[Any] = mapped_column(JSON)  # str, or a list of assistant turns
    model: Mapped[str | None] = mapped_column(String(500), nullable=True)  # never shown to annotators
    sample: Mapped[int] = mapped_column(Integer, default=0)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    response_ids: Mapped[list[Any]] = mapped_column()  # the responses this item compares
    position: Mapped[int] = mapped_column(Integer)
    # a gold item's known answer: {"scores": {"response id": score}} (higher = better); None otherwise
    gold: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class Exclusion(Base):
    """An annotator whose labels of a round are left out of its exports, agreement and leaderboard."""

    __tablename__ = "exclusions"
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id"), Index("ix_assignments_user_status", "user_id", "status"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    order: Mapped[list[Any]] = mapped_column()  # response ids in the order shown (A, B, ...)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | done | skipped
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    shown_at: Mapped[float] = mapped_column(Float, default=time.time)  # reset on undo, for durations
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(16))
    # pairwise: outcome win (winner_id set) | tie | both_bad, strength slightly | much | None
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    winner_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    strength: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # ranking: tiers of response ids, best first; a tier of several is a tie
    ranking: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # rating: {"response id": 1..7}
    ratings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    better_answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    flags: Mapped[list[Any]] = mapped_column(default=list)
    duration_s: Mapped[float] = mapped_column(Float)  # from the item being shown to the label
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class SessionRow(Base):
    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    expires_at: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, default=time.time)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


UPGRADES[1] = _v1_to_v2


# --- opening a database -------------------------------------------------------------------------


def database_url(db: str | os.PathLike) -> str:
    """An SQLAlchemy URL for `db`: a URL as given (it contains '://'), else an SQLite file path."""
    text = os.fspath(db)
    if "://" in text:
        return text
    return "sqlite:///" + str(Path(text).expanduser().resolve())


def _sqlite_setup(engine: Engine) -> None:
    """WAL journal, full fsync on commit, foreign keys, and BEGIN IMMEDIATE for every transaction.

    BEGIN IMMEDIATE takes the write lock at the start of a transaction, so two requests that read and
    then write (claiming an item, submitting a label) queue on `busy_timeout` instead of one failing
    with "database is locked" when it tries to upgrade its read lock (SQLite's deferred default).
    This is SQLAlchemy's documented pysqlite recipe: the driver's own transaction handling is turned
    off and the BEGIN is emitted here. Sessions that only read (`Database.read`) begin deferred, so
    page renders never queue behind writers (WAL readers see the last committed state).
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # read-only sessions (Database.read) begin deferred: in WAL mode they never wait for writers
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("studio_read") else "BEGIN IMMEDIATE")


class Database:
    """An opened studio database: `engine`, and `session()` for one transaction."""

    def __init__(self, url: str, engine: Engine):
        self.url, self.engine = url, engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = sessionmaker(engine.execution_options(studio_read=True), expire_on_commit=False)
        self.is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time, and a writer that finds the lock taken polls for it with
        # growing sleeps (up to 100 ms each), so under load the wait, not the work, is most of a
        # request. Threads of this process therefore queue on a lock of their own before BEGIN
        # IMMEDIATE; other processes on the same file still meet SQLite's busy timeout.
        self._write_lock = threading.RLock() if self.is_sqlite else contextlib.nullcontext()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends normally (before the caller answers
        anyone), rolled back when it raises."""
        with self._write_lock, self._sessions() as s, s.begin():
            yield s

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction for reading (on SQLite it takes no write lock: callers must not write in it)."""
        with self._readers() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(db: str | os.PathLike, *, create: bool = True) -> tuple[Database, bool]:
    """Open (creating or upgrading as needed) the studio database `db`; return it and whether it
    was created just now. `create=False` makes a missing database an error."""
    url = database_url(db)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            if not create and not Path(path).exists():
                raise StudioError(
                    f"no studio database at {path}; create one with `rufus studio new-round` or `rufus studio serve`"
                )
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}, "pool_size": 16, "max_overflow": 16}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    database = Database(url, engine)
    created = _migrate(database)
    return database, created


def _migrate(database: Database) -> bool:
    """Create the schema in an empty database or bring an older one up to date; True if created."""
    with database.engine.begin() as conn:
        tables = set(inspect(conn).get_table_names())
        if "meta" not in tables:
            if tables - {"meta"}:
                raise StudioError(
                    f"{database.url} holds tables that are not a Rufus studio's "
                    f"({', '.join(sorted(tables)[:5])}); use an empty database"
                )
            Base.metadata.create_all(conn)
            conn.execute(Meta.__table__.insert(), [{"key": "schema_version", "value": str(SCHEMA_VERSION)}])
            return True
        row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
        version = int(row or 0)
        if version > SCHEMA_VERSION:
            raise StudioError(
                f"{database.url} was written by a newer Rufus (schema version {version}; this "
                f"one knows up to {SCHEMA_VERSION}); upgrade Rufus to open it"
            )
        while version < SCHEMA_VERSION:
            if version not in UPGRADES:
                raise StudioError(f"no upgrade step from schema version {version}")
            UPGRADES[version](conn)
            version += 1
            conn.execute(Meta.__table__.update().where(Meta.key == "schema_version").values(value=str(version)))
    return False


def get_meta(s: Session, key: str) -> str | None:
    row = s.get(Meta, key)
    return row.value if row else None


def set_meta(s: Session, key: str, value: str) -> None:
    row = s.get(Meta, key)
    if row is None:
        s.add(Meta(key=key, value=value))
    else:
        row.value = value


def excluded_users(s: Session, round_id: int) -> set[int]:
    """The ids of the annotators an admin excluded from the round."""
    return set(s.scalars(select(Exclusion.user_id).where(Exclusion.round_id == round_id)))


def log_event(s: Session, kind: str, user_id: int | None = None, **data: Any) -> None:
    s.add(EventRow(kind=kind, user_id=user_id, data=json.loads(json.dumps(data, default=str))))
