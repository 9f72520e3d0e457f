"""Every bad request gets the right status and the one error shape, over real HTTP."""

import json

import pytest
import requests

JSON = "application/json"
BAD = [
    # (id, raw body, content type, status, code, param)
    ("missing question", {}, JSON, 400, "missing", "question"),
    ("empty question", {"question": ""}, JSON, 400, "empty", "question"),
    ("whitespace question", {"question": " \n\t "}, JSON, 400, "empty", "question"),
    ("question null", {"question": None}, JSON, 400, "invalid_type", "question"),
    ("question number", {"question": 7}, JSON, 400, "invalid_type", "question"),
    ("question list", {"question": ["a"]}, JSON, 400, "invalid_type", "question"),
    ("system_prompt number", {"question": "a", "system_prompt": 1}, JSON, 400, "invalid_type", "system_prompt"),
    ("max_new_tokens string", {"question": "a", "max_new_tokens": "5"}, JSON, 400, "invalid_type", "max_new_tokens"),
    ("max_new_tokens float", {"question": "a", "max_new_tokens": 5.5}, JSON, 400, "invalid_type", "max_new_tokens"),
    ("max_new_tokens bool", {"question": "a", "max_new_tokens": True}, JSON, 400, "invalid_type", "max_new_tokens"),
    ("max_new_tokens zero", {"question": "a", "max_new_tokens": 0}, JSON, 400, "out_of_range", "max_new_tokens"),
    ("max_new_tokens huge", {"question": "a", "max_new_tokens": 2049}, JSON, 400, "out_of_range", "max_new_tokens"),
    ("temperature string", {"question": "a", "temperature": "hot"}, JSON, 400, "invalid_type", "temperature"),
    ("temperature negative", {"question": "a", "temperature": -0.1}, JSON, 400, "out_of_range", "temperature"),
    ("temperature too high", {"question": "a", "temperature": 2.5}, JSON, 400, "out_of_range", "temperature"),
    ("top_p zero", {"question": "a", "top_p": 0}, JSON, 400, "out_of_range", "top_p"),
    ("top_p above one", {"question": "a", "top_p": 1.01}, JSON, 400, "out_of_range", "top_p"),
    ("unknown field", {"question": "a", "max_new_token": 5}, JSON, 400, "unknown_field", "max_new_token"),
    ("question too long", {"question": "a" * 16385}, JSON, 400, "too_long", "question"),
    ("prompt too many tokens", {"question": "x " * 8000}, JSON, 400, "context_length_exceeded", "question"),
    ("body is a list", ["question"], JSON, 400, "invalid_type", None),
    ("body is a string", "question", JSON, 400, "invalid_type", None),
    ("not JSON", b"{question: 1", JSON, 400, "invalid_json", None),
    ("not UTF-8", b'{"question": "\xff"}', JSON, 400, "invalid_json", None),
    ("NaN temperature", b'{"question": "a", "temperature": NaN}', JSON, 400, "invalid_type", "temperature"),
    ("form content type", b"question=a", "application/x-www-form-urlencoded", 415, "unsupported_media_type", None),
    ("no content type", b'{"question": "a"}', None, 415, "unsupported_media_type", None),
    ("oversize body", {"question": "a" * 70000}, JSON, 413, "body_too_large", None),
]


def send(server, path, body, content_type):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    headers.update(server.auth())
    return requests.post(server.url(path), data=data, headers=headers, timeout=30)


def assert_error_shape(response, status, code, param=None, success_flag=True):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == ({"error", "success"} if success_flag else {"error"})
    if success_flag:
        assert body["success"] is False
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    assert isinstance(error["message"], str) and len(error["message"]) > 8
    return error


@pytest.mark.parametrize("path", ["/predict", "/v1/predict"])
@pytest.mark.parametrize("name,body,content_type,status,code,param", BAD, ids=[row[0] for row in BAD])
def test_bad_input_gets_status_and_error_shape(server, path, name, body, content_type, status, code, param):
    error = assert_error_shape(send(server, path, body, content_type), status, code, param)
    assert error["type"] == "invalid_request_error"


def test_messages_say_what_is_wrong(server):
    out_of_range = send(server, "/predict", {"question": "a", "max_new_tokens": 0}, JSON).json()["error"]
    assert out_of_range["message"] == "max_new_tokens must be an integer between 1 and 2048"
    unknown = send(server, "/predict", {"question": "a", "max_new_token": 5}, JSON).json()["error"]
    assert "'max_new_token'" in unknown["message"] and "max_new_tokens" in unknown["message"]


def test_unknown_route_is_json_404(server):
    response = requests.get(server.url("/no/such/route"), timeout=5)
    error = assert_error_shape(response, 404, "not_found", success_flag=False)
    assert error["type"] == "not_found_error" and "/no/such/route" in error["message"]


def test_wrong_method_is_json_405_with_allow(server):
    response = server.get("/predict")
    assert_error_shape(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    assert_error_shape(requests.post(server.url("/healthz"), timeout=5), 405, "method_not_allowed",
                       success_flag=False)
