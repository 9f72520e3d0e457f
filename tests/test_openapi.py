"""GET /openapi.json, generated from the models, and schemathesis against the live service.

The fuzz runs the real schemathesis CLI against real gunicorn with valid tokens: no server error, no
response outside the spec (status, content type, body schema), invalid input refused. Then every
status the spec declares was reached by the fuzz or is reached by a named fault test.
"""

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import requests

from tests.support.servers import BIN

pytestmark = pytest.mark.slow
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
         "negative_data_rejection,response_headers_conformance"
# Statuses a fuzzer with valid tokens cannot produce, and the tests that do produce them.
EXPLAINED = {
    401: "the fuzz sends valid tokens; tests/test_auth_attacks.py and test_tokens_lifecycle.py send bad ones",
    403: "needs a disabled user, a missing scope or a demoted admin: test_auth_attacks.py, test_admin_api.py",
    404: "needs a name or jti that does not exist, or another model: test_admin_api.py, test_chat_openai.py",
    409: "needs a user name taken before, or a token revoked or rotated before: test_admin_api.py, "
         "test_token_rotation.py",
    413: "needs a body over the limit: test_errors_http.py, test_attacks_http.py (chunked)",
    414: "needs a request line past gunicorn's bound (the fuzz may reach it): test_attacks_http.py",
    415: "needs a body that is not JSON: test_errors_http.py",
    431: "needs headers past gunicorn's bounds: test_attacks_http.py",
    422: "needs a content policy and a refused term: test_filtering_http.py",
    429: "the fuzz user has limits it cannot reach: test_quotas_http.py",
    499: "needs a client that leaves: test_attacks_http.py, test_chat_openai.py",
    500: "never expected: test_faults.py makes the engine fail on purpose",
    501: "needs a server without its OCR (a document to read): test_documents_http.py",
    503: "needs the model loading or Redis down: test_faults.py, test_quotas_http.py",
    504: "needs a generation past its deadline: test_engine_limits_http.py",
}
CALLS = [0]  # requests the fuzz made, printed with the statuses it reached
# Answers of one operation the fuzz does not reach, and the tests that do.
EXPLAINED_FOR = {
    ("POST /v1/batches/{batch_id}/cancel", 200): "needs a batch still running (the fuzz's input files fail "
                                                 "validation at once): test_batches_http.py",
    ("DELETE /admin/tokens/{jti}", 200): "needs the jti of an issued token (the fuzz does not issue one for an "
                                         "existing user): test_admin_api.py, test_tokens_lifecycle.py",
    ("POST /admin/tokens/{jti}/rotate", 201): "needs the jti of a live token (the fuzz's rotations of a token it "
                                              "issued may reach it): test_token_rotation.py, test_cli.py",
    ("GET /admin/transcripts/{transcript_id}", 200): "needs a kept transcript (the fuzz's users have transcripts "
                                                     "off): test_transcripts.py",
}


@pytest.fixture(scope="module")
def fuzzed(start_server):
    # The fuzz polls far faster than any client: its polling limit must not hide the 200s it reaches.
    server = start_server(VIBE_MAX_NEW_TOKENS_LIMIT=16, VIBE_DEFAULT_MAX_NEW_TOKENS=8,
                          VIBE_POLL_RATE_LIMIT="100000/minute")
    server.admin_tokens = []
    for name in ("fuzz-admin", "fuzz-changer"):  # the second may disable itself: it fuzzes PATCH and DELETE
        server.cli("users", "add", name, "--admin", "--rate-limit", "100000/minute")
        server.admin_tokens.append(server.cli("tokens", "issue", name, "--scope", "admin").stdout.strip()
                                   .splitlines()[-1])
    return server


def test_the_spec_is_served_without_a_token(fuzzed):
    spec = requests.get(fuzzed.url("/openapi.json"), timeout=10).json()
    assert spec["openapi"] == "3.1.0"
    assert set(spec["paths"]) == {
        "/healthz", "/readyz", "/metrics", "/openapi.json", "/predict", "/v1/predict", "/v1/chat/completions",
        "/v1/models", "/v1/models/{model}", "/v1/me", "/admin/users", "/admin/users/{name}", "/admin/tokens",
        "/admin/tokens/{jti}", "/admin/tokens/{jti}/rotate", "/admin/teams", "/admin/teams/{name}",
        "/admin/teams/{name}/members", "/admin/usage", "/admin/audit", "/admin/cache/purge", "/admin/transcripts",
        "/admin/transcripts/{transcript_id}", "/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content",
        "/v1/batches", "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel"}
    predict = spec["paths"]["/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"}
    body = spec["components"]["schemas"]["PredictRequest"]
    assert body["additionalProperties"] is False and body["required"] == ["question"]
    assert {"type": "integer", "minimum": 1, "maximum": 16} in body["properties"]["max_new_tokens"]["anyOf"]
    for status in ("400", "401", "429", "503"):
        assert predict["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/admin/users"]["get"]  # the document's default: a bearer token
    assert "admin" in spec["paths"]["/admin/users"]["get"]["description"]


def run_schemathesis(server, token, report, *selection, phases="examples,coverage,fuzzing,stateful"):
    seed = os.environ.get("FUZZ_SEED", "20261202")
    command = [str(BIN / "st"), "run", server.url("/openapi.json"), "-H", f"Authorization: Bearer {token}",
               "--checks", CHECKS, "--max-examples", os.environ.get("FUZZ_EXAMPLES", "100"), "--seed", seed,
               "--phases", phases, "--report", "ndjson", "--report-dir", str(report), "--no-color",
               "--suppress-health-check", "all", *selection]
    report.mkdir(parents=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=report,  # its cache too
                            env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    return reached(report)


def reached(report):
    """{"METHOD /path": {statuses the fuzz got}} from schemathesis' ndjson report."""
    seen = defaultdict(set)
    [path] = Path(report).glob("*.ndjson")
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        for interaction in finished["recorder"].get("interactions", {}).values():
            request, response = interaction["request"], interaction["response"]
            if response is None:
                continue
            seen[f"{request['method']} {_template(request['uri'])}"].add(response["status_code"])
            CALLS[0] += 1
    return seen


def _template(uri):
    from urllib.parse import urlsplit

    parts = urlsplit(uri).path.split("/")
    if parts[1:3] == ["admin", "users"] and len(parts) == 4:
        return "/admin/users/{name}"
    if parts[1:3] == ["admin", "tokens"] and len(parts) in (4, 5):
        return "/".join(["/admin/tokens/{jti}", *parts[4:]])
    if parts[1:3] == ["admin", "teams"] and len(parts) >= 4:
        return "/".join(parts[:3] + ["{name}"] + parts[4:])
    if parts[1:3] == ["admin", "transcripts"] and len(parts) == 4:
        return "/admin/transcripts/{transcript_id}"
    if parts[1:3] == ["v1", "models"] and len(parts) == 4:
        return "/v1/models/{model}"
    if parts[1:3] in (["v1", "files"], ["v1", "batches"]) and len(parts) >= 4:
        name = "file_id" if parts[2] == "files" else "batch_id"
        return "/".join(parts[:3] + ["{" + name + "}"] + parts[4:])
    return urlsplit(uri).path


def test_schemathesis_finds_nothing_and_every_declared_status_is_reached_or_explained(fuzzed, tmp_path):
    seen = run_schemathesis(fuzzed, fuzzed.token, tmp_path / "generate", "--exclude-path-regex", "^/admin")
    # Admin routes with admin-only tokens and no stateful phase. Schemathesis reuses names it saw in answers,
    # so the operations that can disable, remove or revoke the caller run last, as another admin.
    changers = "update_user|remove_user|revoke_token|rotate_token"
    passes = [(fuzzed.admin_tokens[0], "admin", "examples,coverage,fuzzing",
               ("--include-path-regex", "^/admin", "--exclude-operation-id-regex", changers)),
              (fuzzed.admin_tokens[1], "changers", "examples,coverage,fuzzing,stateful",  # follows the links
               ("--include-operation-id-regex", f"{changers}|add_user|add_token"))]
    for token, name, phases, selection in passes:
        for label, statuses in run_schemathesis(fuzzed, token, tmp_path / name, *selection, phases=phases).items():
            seen[label] |= statuses
    spec = requests.get(fuzzed.url("/openapi.json"), timeout=10).json()
    print(json.dumps({"fuzz_requests": CALLS[0], "statuses": {k: sorted(v) for k, v in sorted(seen.items())
                                                              if k.split(" ", 1)[1] in spec["paths"]}}))
    unexplained = {}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            if path == "/openapi.json":  # schemathesis does not call the document it reads; fetched above
                continue
            declared = {int(status) for status in operation["responses"]}
            assert seen.get(label), f"the fuzz never called {label}: {dict(seen)}"
            assert seen[label] <= declared, f"{label} answered {seen[label] - declared}, not in the spec"
            missing = {status for status in declared - seen[label] - set(EXPLAINED)
                       if (label, status) not in EXPLAINED_FOR}
            if missing:
                unexplained[label] = sorted(missing)
    assert not unexplained, f"declared statuses neither reached by the fuzz nor explained: {unexplained}"
    # Methods the spec does not declare (the fuzz tries them) are refused with the one error shape's 405.
    undeclared = {label: statuses for label, statuses in seen.items()
                  if label.split(" ", 1)[1] in spec["paths"]
                  and label.split(" ", 1)[0].lower() not in spec["paths"][label.split(" ", 1)[1]]}
    assert undeclared and all(statuses == {405} for statuses in undeclared.values()), undeclared
    # The fuzz did reach the answers and refusals that matter.
    assert 200 in seen["POST /predict"] and 400 in seen["POST /predict"]
    assert 200 in seen["POST /v1/chat/completions"] and 201 in seen["POST /admin/users"]
