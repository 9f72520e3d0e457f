"""App behaviour best seen through Flask's test client: the 500 path and the loading state."""

import logging
import threading

import pytest

from auth import keys
from auth.tokens import issue_token
from service.api.access import public
from service.app import create_app
from service.inference.engine import Engine
from service.settings import load_settings
from service.state import state


@pytest.fixture
def app(tiny_model, tmp_path):
    keys.generate(tmp_path / "keys")
    app = create_app(load_settings(model_path=tiny_model, torch_threads=1, jwt_key_dir=tmp_path / "keys",
                                   db_url=f"sqlite:///{tmp_path}/db.sqlite"))

    @app.get("/boom")
    @public
    def boom():
        raise RuntimeError("secret detail /etc/vibethinker/key.pem")

    yield app
    for served in state(app).models:
        served.engine.stop(timeout=30)


def test_unexpected_exception_is_a_500_without_its_text(app, caplog):
    caplog.set_level(logging.ERROR, logger="vibethinker")
    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "secret" not in response.get_data(as_text=True) and "req-500" in error["message"]
    records = [r for r in caplog.records if r.name == "vibethinker.errors"]
    assert records and records[0].request_id == "req-500" and records[0].exc_info


@pytest.mark.parametrize("fails,code,retry", [(False, "model_loading", "5"), (True, "model_failed", "30")])
def test_requests_before_the_model_is_ready_get_503_with_retry_after(app, fails, code, retry):
    loading = threading.Event()

    def slow_loader():  # the first seconds of a worker's life, or a broken model folder
        loading.wait(30)
        raise OSError("model.safetensors is truncated")

    engine = Engine(slow_loader, queue_size=1, torch_threads=1, name="slow").start()
    state(app).models.default.engine.stop(timeout=30)
    state(app).models.default.engine = engine
    if fails:
        loading.set()
        engine.stop(timeout=10)
    client = app.test_client()
    store, keyset, settings = state(app).store, state(app).keys, state(app).settings
    store.add_user("u")
    token, _ = issue_token(store, keyset, "u", issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    predict = client.post("/predict", json={"question": "hi"}, headers={"Authorization": f"Bearer {token}"})
    for response in (predict, client.get("/readyz")):
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == code
        assert response.headers["Retry-After"] == retry
        assert "truncated" not in response.get_data(as_text=True)
    loading.set()
