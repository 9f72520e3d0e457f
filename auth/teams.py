"""Teams in the store: the limits (and the transcripts flag) their members share; a user is in one team at most.

A mixin of auth.store.Store (its engine, clock, audit trail and access
epoch): every change that can move a member's limits is audited and replaces
the access epoch, since a cached token carries its team's limits (auth.cache).
"""

import sqlalchemy as sa

from auth.checks import check_name, check_quotas
from auth.errors import StoreError
from auth.schema import aware, teams, users

TEAM_FIELDS = ("rate_limit", "daily_tokens", "max_concurrent")  # the limits a team's members share
# A token record's (and a user row's) team columns: service.serving.caller admits by them, auth.transcripts
# decides by the flag.
TEAM_COLUMNS = (teams.c.name.label("team"), teams.c.rate_limit.label("team_rate_limit"),
                teams.c.daily_tokens.label("team_daily_tokens"), teams.c.max_concurrent.label("team_max_concurrent"),
                teams.c.transcripts.label("team_transcripts"))


class TeamStore:
    """Store's team methods."""

    def add_team(self, name, members=(), actor="system", source="cli", **fields):
        """Create a team with the limits its members will share (and its transcripts flag), and its first
        `members`, in one transaction; StoreError 409 if the name is taken, else as set_members for a member."""
        check_name(name, "team")
        _check_team_fields(fields)
        epoch = None
        with self.engine.begin() as conn:
            if conn.execute(sa.select(teams.c.id).where(teams.c.name == name)).first():
                raise StoreError(409, f"team {name!r} already exists", "team_exists", "name")
            team_id = conn.execute(teams.insert().values(
                name=name, created_at=self.clock(), transcripts=bool(fields.get("transcripts")),
                **{k: fields.get(k) for k in TEAM_FIELDS})).inserted_primary_key[0]
            self._audit(conn, actor, "team.add", name, {k: v for k, v in fields.items() if v is not None}, source)
            if members:
                _move(conn, team_id, name, list(members), [])
                self._audit(conn, actor, "team.members", name, {"added": sorted(members), "removed": []}, source)
                epoch = self._changed_access(conn)
        if epoch is not None:
            self.publish(epoch)
        return self.get_team(name)

    def get_team(self, name):
        """The team as a dict, with its members' names; StoreError 404 if unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(teams).where(teams.c.name == name)).mappings().first()
            if row is None:
                raise StoreError(404, f"no such team: {name!r}", "unknown_team", "name")
            members = conn.execute(sa.select(users.c.name).where(users.c.team_id == row["id"])
                                   .order_by(users.c.name)).scalars().all()
        return _team(row, members)

    def list_teams(self):
        with self.engine.connect() as conn:
            members = {}
            for team_id, user in conn.execute(sa.select(users.c.team_id, users.c.name)
                                              .where(users.c.team_id.is_not(None)).order_by(users.c.name)):
                members.setdefault(team_id, []).append(user)
            return [_team(r, members.get(r["id"], []))
                    for r in conn.execute(sa.select(teams).order_by(teams.c.name)).mappings()]

    def update_team(self, name, actor="system", source="cli", **changes):
        """Change a team's shared limits (None clears one: no team limit of that kind) or its transcripts flag."""
        _check_team_fields(changes)
        team = self.get_team(name)
        with self.engine.begin() as conn:
            conn.execute(teams.update().where(teams.c.id == team["id"]).values(**changes))
            self._audit(conn, actor, "team.update", name, changes, source)
            epoch = self._changed_access(conn)  # cached tokens carry their team's limits
        self.publish(epoch)
        return self.get_team(name)

    def set_members(self, name, add=(), remove=(), actor="system", source="cli"):
        """Add users to the team and remove others from it, in one transaction. A user already in another team
        is refused (StoreError 409: remove them there first), as is removing one who is not a member."""
        team = self.get_team(name)
        with self.engine.begin() as conn:
            _move(conn, team["id"], name, list(add), list(remove))
            self._audit(conn, actor, "team.members", name, {"added": sorted(add), "removed": sorted(remove)},
                        source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return self.get_team(name)

    def remove_team(self, name, actor="system", source="cli"):
        """Delete a team; its members stay, in no team. Their usage rows keep the team's name."""
        team = self.get_team(name)
        with self.engine.begin() as conn:
            conn.execute(users.update().where(users.c.team_id == team["id"]).values(team_id=None))
            conn.execute(teams.delete().where(teams.c.id == team["id"]))
            self._audit(conn, actor, "team.remove", name, {"members": team["members"]}, source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return team


def _check_team_fields(fields):
    unknown = set(fields) - {*TEAM_FIELDS, "transcripts"}
    if unknown:
        raise StoreError(400, f"a team has no {sorted(unknown)[0]}", "unknown_field", sorted(unknown)[0])
    if not isinstance(fields.get("transcripts", False), bool):
        raise StoreError(400, "transcripts must be true or false", "invalid_value", "transcripts")
    check_quotas({k: v for k, v in fields.items() if k in TEAM_FIELDS})


def _team(row, members):
    return {"id": row["id"], "name": row["name"], **{k: row[k] for k in TEAM_FIELDS},
            "transcripts": bool(row["transcripts"]), "members": list(members),
            "created_at": aware(row["created_at"]).isoformat()}


def _move(conn, team_id, team, add, remove):
    """Put users `add` in team `team` and take `remove` out of it, inside the caller's transaction; StoreError
    (nothing changed) for an unknown user, one in another team, or one to remove who is not a member."""
    found = {row.name: row for row in conn.execute(
        sa.select(users.c.id, users.c.name, users.c.team_id).where(users.c.name.in_([*add, *remove])))}
    for user in (*add, *remove):
        if user not in found:
            raise StoreError(404, f"no such user: {user!r}", "unknown_user", "members")
    for user in add:
        if found[user].team_id not in (None, team_id):
            other = conn.execute(sa.select(teams.c.name).where(teams.c.id == found[user].team_id)).scalar()
            raise StoreError(409, f"{user!r} is in team {other!r}: remove them from it first", "in_another_team",
                             "members")
    for user in remove:
        if found[user].team_id != team_id:
            raise StoreError(409, f"{user!r} is not a member of team {team!r}", "not_a_member", "members")
    if add:
        conn.execute(users.update().where(users.c.name.in_(add)).values(team_id=team_id))
    if remove:
        conn.execute(users.update().where(users.c.name.in_(remove)).values(team_id=None))
