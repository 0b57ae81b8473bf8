"""Every table of the store, declared once (SQLAlchemy Core), for SQLite and PostgreSQL alike.

Status columns are enums enforced by the schema (CHECK constraints); the vote rules (one vote per rater
and task, only on assigned tasks, one task per unordered system pair) are constraints too, so they hold
whatever process writes. ``sft_core/db/migrations.py`` brings an existing database to this shape.
"""
from __future__ import annotations

from sqlalchemy import (CheckConstraint, Column, Float, ForeignKey, ForeignKeyConstraint, Index, Integer, MetaData,
                        PrimaryKeyConstraint, Table, Text, UniqueConstraint)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import GenericFunction

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
EVAL_STATUSES = ("queued", "running", "succeeded", "failed", "interrupted")
ACTIVE = ("queued", "running")
RATER_KINDS = ("invite", "open", "hf")
VOTE_CHOICES = ("left", "right", "tie", "both_bad")
MAX_COMMENT = 2000

metadata = MetaData()


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=name)


def _flag(column: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN (0, 1)")


datasets = Table(
    "datasets", metadata,
    Column("name", Text, nullable=False),
    Column("version", Text, nullable=False),          # content hash (short)
    Column("created_at", Float, nullable=False),
    Column("path", Text, nullable=False),
    Column("source", Text),                            # original file name
    Column("n_rows", Integer, nullable=False),
    Column("splits", Text, nullable=False),            # JSON {split: n_rows}
    PrimaryKeyConstraint("name", "version"),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Text, primary_key=True),
    Column("kind", Text, nullable=False),              # train | eval | kb_build | ...
    Column("status", Text, nullable=False),
    Column("ref", Text),                               # the run / eval / KB the job works on
    Column("payload", Text, nullable=False, server_default="{}"),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("pid", Integer),
    Column("pid_start", Text),                         # the pid's start time, checked before any signal
    Column("heartbeat_at", Float),
    Column("cancel_requested", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("progress", Text, nullable=False, server_default="{}"),
    Column("worker_ref", Text),                        # where the worker runs: local:PID:START | ray:SUBMISSION_ID
    _one_of("status", JOB_STATUSES, "jobs_status_check"),
)
Index("jobs_status", jobs.c.status, jobs.c.created_at)

runs = Table(
    "runs", metadata,
    Column("id", Text, primary_key=True),              # also the adapter's name in the engine
    Column("dataset", Text, nullable=False),
    Column("dataset_version", Text, nullable=False),
    Column("base_model", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("path", Text, nullable=False),
    Column("config", Text, nullable=False, server_default="{}"),
    Column("metrics", Text, nullable=False, server_default="{}"),
    _one_of("status", RUN_STATUSES, "runs_status_check"),
)

evals = Table(
    "evals", metadata,
    Column("id", Text, primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("dataset_version", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("systems", Text, nullable=False),           # JSON list
    Column("status", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("path", Text, nullable=False),
    Column("config", Text, nullable=False, server_default="{}"),
    _one_of("status", EVAL_STATUSES, "evals_status_check"),
)

kbs = Table(
    "kbs", metadata,
    Column("name", Text, primary_key=True),
    Column("path", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("n_docs", Integer, nullable=False),
    Column("n_chunks", Integer, nullable=False),
    Column("embedder", Text, nullable=False),
)

# Blind human rating (evals/rating/).
campaigns = Table(
    "campaigns", metadata,
    Column("id", Text, primary_key=True),
    Column("eval_id", Text, nullable=False),
    Column("systems", Text, nullable=False),           # JSON list
    Column("show_reference", Integer, _flag("show_reference"), nullable=False, server_default="1"),
    Column("created_at", Float, nullable=False),
    Column("name", Text, nullable=False, server_default=""),
    # anyone may join under a self-chosen name (bound to a signed key)
    Column("open_rating", Integer, _flag("open_rating"), nullable=False, server_default="0"),
    Column("published_at", Float),                     # results shown to raters
    Column("closed_at", Float),                        # no more votes
    Column("guidelines", Text, nullable=False, server_default=""),
    # a rater learns which systems were A and B, only on tasks they have voted on
    Column("reveal_after_vote", Integer, _flag("reveal_after_vote"), nullable=False, server_default="0"),
)

# Server-issued rater identities. invite: a secret link for one campaign (only its sha256 is kept);
# open: a self-chosen name bound to an HMAC-signed key; hf: a Hugging Face account (OAuth, on a Space).
raters = Table(
    "raters", metadata,
    Column("id", Text, primary_key=True),              # inv-<hex> | open-<hex> | hf:<username>
    Column("kind", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("campaign_id", Text, ForeignKey("campaigns.id")),
    Column("token_sha256", Text, unique=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    _one_of("kind", RATER_KINDS, "raters_kind_check"),
    CheckConstraint("(kind = 'invite') = (token_sha256 IS NOT NULL AND campaign_id IS NOT NULL)",
                    name="raters_invite_check"),
)

rating_tasks = Table(
    "rating_tasks", metadata,
    Column("id", Text, primary_key=True),
    Column("campaign_id", Text, ForeignKey("campaigns.id"), nullable=False),
    Column("row_id", Text, nullable=False),
    Column("system_left", Text, nullable=False),
    Column("system_right", Text, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("reference", Text),
    Column("output_left", Text, nullable=False),
    Column("output_right", Text, nullable=False),
    CheckConstraint("system_left <> system_right", name="rating_tasks_two_systems"),
    UniqueConstraint("campaign_id", "row_id", "system_left", "system_right"),
)


class pair_low(GenericFunction):
    """The smaller of two values: SQLite's two-argument min(), PostgreSQL's LEAST."""
    inherit_cache = True


class pair_high(GenericFunction):
    inherit_cache = True


@compiles(pair_low)
def _low(element, compiler, **kw):
    return f"min({compiler.process(element.clauses, **kw)})"


@compiles(pair_low, "postgresql")
def _low_pg(element, compiler, **kw):
    return f"LEAST({compiler.process(element.clauses, **kw)})"


@compiles(pair_high)
def _high(element, compiler, **kw):
    return f"max({compiler.process(element.clauses, **kw)})"


@compiles(pair_high, "postgresql")
def _high_pg(element, compiler, **kw):
    return f"GREATEST({compiler.process(element.clauses, **kw)})"


# one task per unordered system pair and row, whichever side each system is shown on
Index("rating_tasks_pair", rating_tasks.c.campaign_id, rating_tasks.c.row_id,
      pair_low(rating_tasks.c.system_left, rating_tasks.c.system_right),
      pair_high(rating_tasks.c.system_left, rating_tasks.c.system_right), unique=True)

rating_assignments = Table(
    "rating_assignments", metadata,
    Column("task_id", Text, ForeignKey("rating_tasks.id"), nullable=False),
    Column("rater", Text, nullable=False),
    Column("assigned_at", Float, nullable=False),
    PrimaryKeyConstraint("task_id", "rater"),
)
Index("rating_assignments_rater", rating_assignments.c.rater)

votes = Table(
    "votes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("campaign_id", Text, ForeignKey("campaigns.id"), nullable=False),
    Column("task_id", Text, ForeignKey("rating_tasks.id"), nullable=False),
    Column("rater", Text, nullable=False),
    Column("choice", Text, nullable=False),
    Column("comment", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    _one_of("choice", VOTE_CHOICES, "votes_choice_check"),
    CheckConstraint(f"length(comment) <= {MAX_COMMENT}", name="votes_comment_length"),
    UniqueConstraint("task_id", "rater"),
    # only assigned tasks can be voted on
    ForeignKeyConstraint(["task_id", "rater"], ["rating_assignments.task_id", "rating_assignments.rater"]),
    sqlite_autoincrement=True,
)
Index("votes_campaign", votes.c.campaign_id)

vote_history = Table(
    "vote_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("vote_id", Integer, ForeignKey("votes.id"), nullable=False),
    Column("choice", Text, nullable=False),
    Column("comment", Text, nullable=False),
    Column("changed_at", Float, nullable=False),
    sqlite_autoincrement=True,
)
