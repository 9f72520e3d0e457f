"""The tables of batch jobs (the OpenAI Batch API): uploaded files and their bytes, jobs, and each job's lines.

Declared on the store's metadata (auth.schema), whose migrations create and
upgrade them with the rest of the schema.
"""

import sqlalchemy as sa

from auth.schema import metadata

files = sa.Table(
    "files", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user", sa.String(64), nullable=False, index=True),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), index=True),  # purged after it; NULL: never
)
batches = sa.Table(
    "batches", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user", sa.String(64), nullable=False, index=True),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("output_file_id", sa.String(64)),
    sa.Column("error_file_id", sa.String(64)),
    sa.Column("errors", sa.Text),  # JSON: the validation errors of a failed batch
    sa.Column("metadata", sa.Text),  # JSON: the client's metadata
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("in_progress_at", sa.DateTime(timezone=True)),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finalizing_at", sa.DateTime(timezone=True)),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("failed_at", sa.DateTime(timezone=True)),
    sa.Column("expired_at", sa.DateTime(timezone=True)),
    sa.Column("cancelling_at", sa.DateTime(timezone=True)),
    sa.Column("cancelled_at", sa.DateTime(timezone=True)),
)
batch_lines = sa.Table(
    "batch_lines", metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id"), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),
    sa.Column("custom_id", sa.String(255), nullable=False),
    sa.Column("prepared", sa.Text, nullable=False),  # JSON: prompt ids, parameters, what the answer echoes
    sa.Column("status", sa.String(16), nullable=False),  # pending, running, done, failed
    sa.Column("result", sa.Text),  # JSON: the output (or error) line, once done or failed
    # The batch runner computing a running line (service.admission.counters.ledger_name), and since when:
    # with several servers on one database, only that runner may finish it, and its line goes back to
    # pending when that runner stops beating.
    sa.Column("owner", sa.String(128)),
    sa.Column("claimed_at", sa.DateTime(timezone=True)),
    sa.Index("ix_batch_lines_status", "batch_id", "status"),
)
# A file's bytes, in pieces of at most 1 MiB in order, so every server of a cluster (and a backup) has them.
file_chunks = sa.Table(
    "file_chunks", metadata,
    sa.Column("file_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
