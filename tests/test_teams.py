"""Teams in process (Flask's test client, the real app, store and engine): the admin API and the CLI's store
calls, /v1/me, usage per team, and members held to the limits they share, live and by batch. Exactness across
two servers is tests/test_cluster_http.py's."""

import pytest

from service.state import state
from tests.support.inprocess import BatchUser, bearer, make_app, stop_app

ASK = {"question": "What is 2 + 3?", "max_new_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    app = make_app(tiny_model, tmp_path_factory.mktemp("teams"))
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def admin(app):
    headers = bearer(app, "root-t", "generate admin", is_admin=True)
    client = app.test_client()
    return lambda method, path, body=None: client.open(path, method=method, json=body, headers=headers)


def members(app, team, *names, **quotas):
    """Users `names` in `team`, each with a token: their Authorization headers."""
    headers = [bearer(app, name, **quotas) for name in names]
    state(app).store.set_members(team, add=list(names))
    return headers


def test_a_team_is_created_changed_filled_and_removed_through_the_api_each_step_audited(app, admin):
    state(app).store.add_user("tm-a")
    state(app).store.add_user("tm-b")
    created = admin("POST", "/admin/teams", {"name": "crew", "daily_tokens": 5000, "members": ["tm-a"]})
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["members"] == ["tm-a"] and created.get_json()["rate_limit"] is None
    changed = admin("PATCH", "/admin/teams/crew", {"rate_limit": "100/minute", "daily_tokens": None})
    assert (changed.get_json()["rate_limit"], changed.get_json()["daily_tokens"]) == ("100/minute", None)
    moved = admin("POST", "/admin/teams/crew/members", {"add": ["tm-b"], "remove": ["tm-a"]})
    assert moved.get_json()["members"] == ["tm-b"]
    users = {u["name"]: u for u in admin("GET", "/admin/users").get_json()["data"]}
    assert (users["tm-a"]["team"], users["tm-b"]["team"], users["tm-b"]["team_rate_limit"]) == \
        (None, "crew", "100/minute")
    assert [t["name"] for t in admin("GET", "/admin/teams").get_json()["data"]] == ["crew"]
    removed = admin("DELETE", "/admin/teams/crew")
    assert removed.status_code == 200 and admin("GET", "/admin/teams/crew").status_code == 404
    assert state(app).store.get_user("tm-b")["team"] is None  # the member stays, in no team
    actions = [e["action"] for e in admin("GET", "/admin/audit?limit=6").get_json()["data"]]
    assert actions[:5] == ["team.remove", "team.members", "team.update", "team.members", "team.add"]


@pytest.mark.parametrize("method,path,body,status,code,param", [
    ("POST", "/admin/teams", {"name": "Bad Team"}, 400, "invalid_name", "name"),
    ("POST", "/admin/teams", {"name": "t1", "max_concurrent": 0}, 400, "out_of_range", "max_concurrent"),
    ("POST", "/admin/teams", {"name": "t1", "rate_limit": "lots"}, 400, "invalid_rate_limit", "rate_limit"),
    ("POST", "/admin/teams", {"name": "t1", "models": ["x"]}, 400, "unknown_field", "models"),
    ("POST", "/admin/teams", {"name": "t1", "members": ["nobody"]}, 404, "unknown_user", "members"),
    ("PATCH", "/admin/teams/nosuch", {"daily_tokens": 5}, 404, "unknown_team", "name"),
    ("PATCH", "/admin/teams/errs", {}, 400, "empty", None),
    ("POST", "/admin/teams/errs/members", {}, 400, "empty", None),
    ("POST", "/admin/teams/errs/members", {"add": ["in-other"]}, 409, "in_another_team", "members"),
    ("POST", "/admin/teams/errs/members", {"remove": ["root-t"]}, 409, "not_a_member", "members"),
    ("POST", "/admin/teams", {"name": "errs"}, 409, "team_exists", "name"),
    ("GET", "/admin/usage?by=group", None, 400, "invalid_value", "by"),
])
def test_bad_team_requests_get_a_precise_error(app, admin, method, path, body, status, code, param):
    store = state(app).store
    if not any(t["name"] == "errs" for t in store.list_teams()):
        store.add_team("errs")
        store.add_team("other")
        store.add_user("in-other")
        store.set_members("other", add=["in-other"])
    answer = admin(method, path, body)
    assert answer.status_code == status, answer.get_json()
    error = answer.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    # A refused change changed nothing: no member moved, no team made (not even with a bad member).
    assert store.get_team("errs")["members"] == [] and store.get_team("other")["members"] == ["in-other"]
    assert [t["name"] for t in store.list_teams()] == ["errs", "other"]


def test_teams_are_for_admins_only(app):
    headers = bearer(app, "not-admin", "generate")
    client = app.test_client()
    assert client.get("/admin/teams", headers=headers).status_code == 403
    assert client.post("/admin/teams", json={"name": "mine"}, headers=headers).status_code == 403


def test_members_share_the_teams_budget_and_see_it_in_v1_me(app):
    store = state(app).store
    store.add_team("budgeted", daily_tokens=200)
    one, two = members(app, "budgeted", "bud-1", "bud-2")
    client = app.test_client()
    first = client.post("/v1/predict", json=ASK, headers=one)
    assert first.status_code == 200, first.get_json()
    used = first.get_json()["usage"]["total_tokens"]
    need = first.get_json()["usage"]["prompt_tokens"] + ASK["max_new_tokens"]
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 200 - used  # the team's is the tighter budget
    answered = 1
    while (answer := client.post("/v1/predict", json=ASK, headers=two)).status_code == 200:
        used += answer.get_json()["usage"]["total_tokens"]
        answered += 1
    error = answer.get_json()["error"]
    assert answer.status_code == 429 and error["code"] == "daily_token_quota_exceeded"
    assert "team budgeted's daily token budget of 200" in error["message"] and used + need > 200 >= used
    me = client.get("/v1/me", headers=one).get_json()
    assert me["team"] == {"name": "budgeted", "limits": {"rate_limit": None, "daily_tokens": 200,
                                                         "max_concurrent": None},
                          "today": {"requests": me["team"]["today"]["requests"], "prompt_tokens":
                                    me["team"]["today"]["prompt_tokens"], "completion_tokens":
                                    me["team"]["today"]["completion_tokens"], "total_tokens": used}}
    assert me["today"]["total_tokens"] < used  # the member's own use is a part of the team's
    assert client.get("/v1/me", headers=bearer(app, "loner")).get_json()["team"] is None
    per_team = [r for r in store.usage_by_day(by="team") if r["team"] == "budgeted"]
    assert (per_team[0]["total_tokens"], per_team[0]["requests"]) == (used, answered)  # refusals used nothing


def test_members_share_the_teams_rate_limit_and_a_change_applies_at_once(app):
    store = state(app).store
    store.add_team("paced", rate_limit="3/minute")
    one, two = members(app, "paced", "pace-1", "pace-2", rate_limit="100/minute")
    client = app.test_client()
    codes = [client.post("/v1/predict", json=ASK, headers=h).status_code for h in (one, two, one, two)]
    assert codes == [200, 200, 200, 429]
    refused = client.post("/v1/predict", json=ASK, headers=one).get_json()["error"]
    assert refused["code"] == "rate_limit_exceeded" and "team paced (of pace-1)" in refused["message"]
    store.update_team("paced", rate_limit=None)  # no team limit: each member's own applies again
    assert client.post("/v1/predict", json=ASK, headers=two).status_code == 200
    store.set_members("paced", remove=["pace-1"])
    store.update_team("paced", rate_limit="3/minute")
    assert client.post("/v1/predict", json=ASK, headers=one).status_code == 200  # no longer a member


def test_a_members_batch_lines_count_against_the_teams_budget(app):
    store = state(app).store
    store.add_team("batching", daily_tokens=150)
    user = BatchUser(app, "bat-1")
    store.set_members("batching", add=["bat-1"])
    batch = user.submit("/v1/predict", *[ASK] * 4)
    batch = user.run(batch)
    assert batch["status"] == "completed", batch
    assert batch["output_file_id"] and batch["error_file_id"], batch  # some lines answered, then refused
    outcomes = [line["response"]["status_code"] for file in ("output_file_id", "error_file_id")
                for line in user.lines(batch[file])]
    rows = [r for r in store.usage_rows("bat-1") if r["status"] == 200]
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= 150
    assert 429 in outcomes and all(r["team"] == "batching" for r in rows), outcomes


def test_batch_lines_wait_for_the_teams_rate_window_with_its_live_requests():
    """The lines' side of a team's rate limit (service.admission.rates): live requests and lines of all members
    together fit the team's window; a line that does not fit waits, it is never failed."""
    from limits import parse
    from limits.storage import MemoryStorage
    from limits.strategies import MovingWindowRateLimiter

    from service.admission.rates import TEAM_SCOPE, LineRates, team_key

    strategy = MovingWindowRateLimiter(MemoryStorage())
    rates = LineRates(strategy, "1000/minute")
    row = lambda name: {"name": name, "active": True, "team": "lines", "team_rate_limit": "3/minute"}  # noqa: E731
    strategy.hit(parse("3/minute"), team_key("lines"), TEAM_SCOPE)  # a member's live request
    assert not rates.must_wait(row("l-1"))
    rates.count(row("l-1"))
    assert not rates.must_wait(row("l-2"))
    rates.count(row("l-2"))  # 1 live + 2 lines: the team's window is full
    assert rates.must_wait(row("l-2")) and rates.must_wait(row("l-3"))
    assert not rates.must_wait({**row("l-4"), "team": None})  # not a member: their own window only
