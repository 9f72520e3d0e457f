"""Batch jobs in the database (service.batches.tables' batches, batch_lines), beside their files.

A batch is a row and one row per input line: `pending`, `running` (handed
to an engine by one batch runner, its `owner`), then `done` or `failed`
with its output line. A line is marked `running` only if it is still
pending, in one statement, so two runners never take the same line; only
its owner may finish it. A runner that starts sets the running lines of
dead runners on its host back to pending, and any runner does the same for
an owner that stopped beating (service.batches.runner): a crash repeats
only the lines it was computing, never a finished one.

BatchRecords is also the FileRecords of the input and output files
(service.batches.files): finalizing a batch writes its output and error
files.

Every read takes the caller (`user`, `admin`): a user sees only their own
batches (404 for anyone else's), an admin sees all.
"""

import json
import secrets
from datetime import timedelta

import sqlalchemy as sa

from auth.schema import usage as usage_table

from service.batches import quotas
from service.batches.files import CHUNK, FileRecords, now, timestamp
from service.batches.tables import batch_lines, batches
from service.errors import Conflict, NotFound

TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
         "cancelled_at")


class BatchRecords(FileRecords):
    """Batches and their lines, and (as FileRecords) files, over the store's database engine and a folder."""

    # --- batches ---
    def create_batch(self, user, endpoint, input_file_id, window, window_s, metadata, lines, errors, quota=None):
        """A batch of `lines` [(custom_id, prepared)], in progress, or failed with `errors` when there are any;
        with the user's `quota` (batches.quotas), only if it allows one more batch now."""
        batch_id, created = f"batch_{secrets.token_hex(12)}", now()
        failed = bool(errors)
        row = dict(id=batch_id, user=user, endpoint=endpoint, input_file_id=input_file_id, completion_window=window,
                   status="failed" if failed else "in_progress", total=0 if failed else len(lines),
                   created_at=created, expires_at=created + timedelta(seconds=window_s),
                   metadata=json.dumps(metadata) if metadata is not None else None,
                   errors=json.dumps({"object": "list", "data": errors}) if failed else None,
                   **({"failed_at": created} if failed else {"in_progress_at": created}))
        with self.engine.begin() as conn:
            if quota is not None:
                quotas.hold(conn, user)
                quotas.check_batches(conn, user, quota)
            conn.execute(batches.insert().values(**row))
            if not failed:
                conn.execute(batch_lines.insert(), [
                    {"batch_id": batch_id, "line": i, "custom_id": custom_id, "prepared": json.dumps(prepared),
                     "status": "pending"} for i, (custom_id, prepared) in enumerate(lines)])
        return self.get_batch(batch_id, user, True)

    def get_batch(self, batch_id, user, admin):
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).mappings().first()
            if row is None or not (admin or row["user"] == user):
                raise NotFound(f"no such batch: {batch_id[:80]!r}", "batch_not_found", "batch_id")
            return _batch_json(row, self._counts(conn, batch_id))

    def list_batches(self, user, admin, limit=20, after=None):
        query = sa.select(batches).order_by(batches.c.created_at.desc(), batches.c.id.desc())
        if not admin:
            query = query.where(batches.c.user == user)
        with self.engine.connect() as conn:
            if after is not None:
                anchor = conn.execute(sa.select(batches.c.created_at).where(batches.c.id == after)).scalar()
                if anchor is not None:
                    query = query.where(batches.c.created_at < anchor)
            rows = list(conn.execute(query.limit(limit + 1)).mappings())
            data = [_batch_json(r, self._counts(conn, r["id"])) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def owners(self, batch_ids):
        """{batch id: its user} for the batches listed (an admin's view)."""
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(batches.c.id, batches.c.user).where(batches.c.id.in_(batch_ids))).all())

    def cancel(self, batch_id, user, admin):
        batch = self.get_batch(batch_id, user, admin)
        if batch["status"] in ("validating", "in_progress"):
            self.set_status(batch_id, "cancelling", "cancelling_at")
        elif batch["status"] not in ("cancelling", "cancelled"):
            raise Conflict(f"batch {batch_id} is {batch['status']}; only a running batch can be cancelled",
                           "batch_not_cancellable", "batch_id")
        return self.get_batch(batch_id, user, admin)

    def set_status(self, batch_id, status, time_field=None, **values):
        if time_field:
            values[time_field] = now()
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(status=status, **values))

    # --- the runner's side ---
    def running_owners(self):
        """The runners holding running lines (None: lines taken before runners were named)."""
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(batch_lines.c.owner).distinct()
                                    .where(batch_lines.c.status == "running")).scalars())

    def reclaim(self, owner):
        """The running lines of `owner` (a runner that stopped) go back to pending; how many."""
        held = batch_lines.c.owner.is_(None) if owner is None else batch_lines.c.owner == owner
        with self.engine.begin() as conn:
            return conn.execute(batch_lines.update().where(batch_lines.c.status == "running", held)
                                .values(status="pending", owner=None, claimed_at=None)).rowcount

    def beat(self, owner):
        """Renew the running lines `owner` holds: they are its for another lease."""
        with self.engine.begin() as conn:
            conn.execute(batch_lines.update().where(batch_lines.c.status == "running", batch_lines.c.owner == owner)
                         .values(claimed_at=now()))

    def reclaim_stale(self, before, owner):
        """Running lines of other runners not renewed since `before` (their runner stopped) go back to pending;
        how many."""
        with self.engine.begin() as conn:
            return conn.execute(batch_lines.update().where(
                batch_lines.c.status == "running", batch_lines.c.owner != owner, batch_lines.c.claimed_at < before)
                .values(status="pending", owner=None, claimed_at=None)).rowcount

    def active(self):
        """Batches in progress or being cancelled, oldest first."""
        query = (sa.select(batches.c.id, batches.c.user, batches.c.endpoint, batches.c.status, batches.c.expires_at)
                 .where(batches.c.status.in_(("in_progress", "cancelling"))).order_by(batches.c.created_at))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def claim(self, batch_id, owner):
        """The next pending line of a batch, now running for `owner`: (line, custom_id, prepared), or None.

        A line another runner took between the look and the update is skipped, never taken twice."""
        while True:
            with self.engine.begin() as conn:
                row = conn.execute(sa.select(batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.prepared)
                                   .where(batch_lines.c.batch_id == batch_id, batch_lines.c.status == "pending")
                                   .order_by(batch_lines.c.line).limit(1)).first()
                if row is None:
                    return None
                taken = conn.execute(batch_lines.update().where(
                    batch_lines.c.batch_id == batch_id, batch_lines.c.line == row.line,
                    batch_lines.c.status == "pending").values(status="running", owner=owner,
                                                              claimed_at=now())).rowcount
            if taken:
                return row.line, row.custom_id, json.loads(row.prepared)

    def release(self, batch_id, line, owner):
        """A claimed line that could not start (the engine was full): pending again."""
        with self.engine.begin() as conn:
            conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id, batch_lines.c.line == line,
                                                    batch_lines.c.owner == owner, batch_lines.c.status == "running")
                         .values(status="pending", owner=None, claimed_at=None))

    def finish_line(self, batch_id, line, ok, result, owner, usage=None):
        """Store a line's answer and its `usage` row (a dict of the store's usage table) in one transaction:
        a crash keeps both or neither. False, storing nothing, if `owner` no longer holds the line."""
        with self.engine.begin() as conn:
            stored = conn.execute(batch_lines.update().where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.line == line, batch_lines.c.owner == owner,
                batch_lines.c.status == "running").values(status="done" if ok else "failed",
                                                          result=json.dumps(result))).rowcount
            if stored and usage is not None:
                conn.execute(usage_table.insert().values(at=now(), **usage))
            return bool(stored)

    def fail_pending(self, batch_id, result_of):
        """Every pending line failed with `result_of(custom_id)` (an expired batch's rest)."""
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(batch_lines.c.line, batch_lines.c.custom_id).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status == "pending")).all()
            for row in rows:
                conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id,
                                                        batch_lines.c.line == row.line,
                                                        batch_lines.c.status == "pending")
                             .values(status="failed", result=json.dumps(result_of(row.custom_id))))

    def unfinished(self, batch_id, statuses=("pending", "running")):
        """Lines in `statuses` (still pending or running), on any runner."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(batch_lines).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status.in_(statuses))).scalar_one()

    def finalize(self, batch_id, user, status, time_field):
        """Write the output and error files from the finished lines (in input order) and end the batch.

        Only the runner that moves the batch to `finalizing` writes them; False for any other."""
        with self.engine.begin() as conn:
            won = conn.execute(batches.update().where(
                batches.c.id == batch_id, batches.c.status.in_(("in_progress", "cancelling")))
                .values(status="finalizing", finalizing_at=now())).rowcount
        if not won:
            return False
        ids = {}
        with self.engine.connect() as conn:
            rows = list(conn.execute(sa.select(batch_lines.c.status, batch_lines.c.result).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status.in_(("done", "failed")))
                .order_by(batch_lines.c.line)))
        for kind, wanted in (("output_file_id", "done"), ("error_file_id", "failed")):
            data = "".join(r.result + "\n" for r in rows if r.status == wanted).encode()
            if not data:
                continue
            file_id = f"file-{secrets.token_hex(12)}"
            self._store(file_id, user, "batch_output", f"{batch_id}_{kind.split('_')[0]}.jsonl",
                        (data[i:i + CHUNK] for i in range(0, len(data), CHUNK)), len(data))
            ids[kind] = file_id
        self.set_status(batch_id, status, time_field, **ids)
        return True

    def _counts(self, conn, batch_id):
        rows = conn.execute(sa.select(batch_lines.c.status, sa.func.count()).where(
            batch_lines.c.batch_id == batch_id).group_by(batch_lines.c.status)).all()
        by = dict(rows)
        return {"total": sum(by.values()), "completed": by.get("done", 0), "failed": by.get("failed", 0)}


def _batch_json(row, counts):
    body = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
            "errors": json.loads(row["errors"]) if row["errors"] else None,
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
            "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
            "created_at": timestamp(row["created_at"]), "expires_at": timestamp(row["expires_at"]),
            **{name: timestamp(row[name]) for name in TIMES}, "request_counts": counts,
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None}
    return body
