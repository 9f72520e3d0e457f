"""Property: no JSON body makes the service answer 500 (or anything outside the contract)."""

import json

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow  # real restarts, many CLI calls or long runs: not in make test-quick

FIELDS = ["question", "system_prompt", "max_new_tokens", "temperature", "top_p"]
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=8)
bodies = st.one_of(
    values,
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), values, max_size=6),
    st.fixed_dictionaries({"question": st.text(max_size=60)},
                          optional={"system_prompt": st.text(max_size=40), "max_new_tokens": st.integers(-5, 12),
                                    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5)}),
)
ALLOWED = {200, 400, 413, 415, 422}


@pytest.fixture(scope="module")
def fuzzed(start_server):
    return start_server(VIBE_DEFAULT_MAX_NEW_TOKENS=4, VIBE_MAX_NEW_TOKENS_LIMIT=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
@example(body={"question": "0", "system_prompt": "", "top_p": 1.0, "temperature": 5e-324})  # once a 500
def test_no_body_is_a_server_error(fuzzed, body):
    response = requests.post(fuzzed.url("/v1/predict"), data=json.dumps(body), timeout=60,
                             headers={**fuzzed.auth(), "Content-Type": "application/json"})
    assert response.status_code in ALLOWED, (body, response.text)
    payload = response.json()
    if response.status_code == 200:
        assert payload["success"] is True and payload["usage"]["completion_tokens"] <= 8
    else:
        assert set(payload) == {"error", "success"} and set(payload["error"]) == {"message", "type", "param", "code"}
