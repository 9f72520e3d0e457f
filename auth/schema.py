"""The tables of users, teams, tokens, usage, audit, transcripts, the access epoch and the console's
sign-ins, and how a database gets them.

SQLAlchemy Core over any URL: SQLite in WAL mode by default, PostgreSQL by URL
alone. The schema is created and upgraded by Alembic migrations
(auth/migrations, which create every table, the batch jobs' too); a test
holds the tables declared on `metadata` (these, and service.batches.tables')
and the migrated schema equal.
"""

from datetime import timezone
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()
users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("rate_limit", sa.String(200)),
    sa.Column("daily_tokens", sa.Integer),
    sa.Column("max_concurrent", sa.Integer),
    sa.Column("system_prompts", sa.Text),  # JSON list of allowed system prompts; NULL: any
    sa.Column("models", sa.Text),  # JSON list of the models (names or aliases) the user may call; NULL: any
    # What the user may store (service.batches): NULL takes the server's default.
    sa.Column("max_files", sa.Integer),
    sa.Column("max_stored_bytes", sa.BigInteger),
    sa.Column("max_open_batches", sa.Integer),
    sa.Column("daily_batches", sa.Integer),  # batches created per UTC day, failed ones included
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Whether the user's generations are kept as transcripts (auth.transcripts): opt-in, set by an admin.
    sa.Column("transcripts", sa.Boolean, nullable=False, server_default=sa.false()),
    # The team whose budget, concurrency cap and rate limit the user shares (at most one; NULL: none).
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id"), index=True),  # remove_team clears it
)
# Teams: limits their members share, each enforced beside the member's own (service.admission). NULL: no limit
# of that kind for the team (its members' own still apply).
teams = sa.Table(
    "teams", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("rate_limit", sa.String(200)),
    sa.Column("daily_tokens", sa.Integer),
    sa.Column("max_concurrent", sa.Integer),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Whether the members' generations are kept as transcripts (auth.transcripts), whatever their own flag.
    sa.Column("transcripts", sa.Boolean, nullable=False, server_default=sa.false()),
)
tokens = sa.Table(
    "tokens", metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("scope", sa.String(64), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("kid", sa.String(64), nullable=False),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    # When the token stops working; a time still ahead is the end of a rotation's grace (auth.tokens.rotate_token).
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_by", sa.String(64)),
    sa.Column("replaces", sa.String(64)),  # the jti this token was issued to replace (a rotation's successor)
    sa.Column("replaced_by", sa.String(64)),  # the jti of its successor, once rotated
)
audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("source", sa.String(100), nullable=False),
)
usage = sa.Table(
    "usage", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("finish_reason", sa.String(32)),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("model", sa.String(128)),  # the served model that answered (NULL: rows from before models)
    sa.Column("cached", sa.Boolean, nullable=False, server_default=sa.false()),  # answered from the cache
    # Documents read for the request (service.inputs.documents): PDF pages, images read by OCR, time spent.
    sa.Column("document_pages", sa.Integer, nullable=False, server_default="0"),
    sa.Column("document_images", sa.Integer, nullable=False, server_default="0"),
    sa.Column("document_ms", sa.Integer, nullable=False, server_default="0"),
    # Completion tokens fed in by the engine to end a thinking early (service.inference.thinking).
    sa.Column("forced_tokens", sa.Integer, nullable=False, server_default="0"),
    # Prompt tokens read from the engine's prefix cache instead of prefilled (a response-cache hit: all of them).
    sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("team", sa.String(64)),  # the team the request counted against, as it was then (NULL: none)
    sa.Index("ix_usage_user_at", "user", "at"),
    sa.Index("ix_usage_team_at", "team", "at"),
)
# The admins' console (service.console): one-time sign-in links and server-side sessions, each stored under the
# SHA-256 of its secret, so a copy of the database holds no usable link or cookie.
console_links = sa.Table(
    "console_links", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("used_at", sa.DateTime(timezone=True)),
)
console_sessions = sa.Table(
    "console_sessions", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # login: before sign-in (SameSite=Lax); auth: signed in
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), index=True),
    sa.Column("data", sa.Text, nullable=False),  # JSON
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
)
# Kept generations of the users who opted in (auth.transcripts): what an admin filters by in the clear, the
# transcript itself only as AES-GCM ciphertext under the key `kid` of the key folder.
transcripts = sa.Table(
    "transcripts", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("team", sa.String(64)),  # the team the request counted against, as it was then
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model", sa.String(128)),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("kid", sa.String(64), nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),  # nonce, then AES-GCM of the compressed JSON
    sa.Index("ix_transcripts_user_created", "user_id", "created_at"),
    sa.Index("ix_transcripts_team_created", "team", "created_at"),
)
# One row: replaced by every change that can turn a valid token invalid (revocation, disable, demotion,
# a quota or key change), so workers that cache verified tokens know to drop them (auth.cache).
auth_epoch = sa.Table(
    "auth_epoch", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("value", sa.String(64), nullable=False),
)


def aware(value):
    """SQLite returns naive datetimes; every time in the store is UTC."""
    return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)


def connect(url):
    """An SQLAlchemy engine; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
    return engine


def migrate(engine, revision="head"):
    """Bring the schema to `revision` with Alembic (creating it on an empty database)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def revision(engine):
    """The schema's current Alembic revision (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
