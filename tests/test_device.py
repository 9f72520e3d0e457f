"""VIBE_DEVICE: which device a setting means, and the errors of one that cannot be had, on this CPU machine.

The GPU itself is tested by tests/gpu (make test-gpu), on a machine with one."""

import pytest
import requests

from service.inference.model import DeviceError, resolve_device
from service.settings import SettingsError, load_settings
from tests.support.servers import Server


@pytest.mark.parametrize("setting,quantization,gpu,device", [
    ("auto", "none", False, "cpu"), ("auto", "none", True, "cuda"), ("auto", "int8", True, "cpu"),
    ("cpu", "none", True, "cpu"), ("cuda", "none", True, "cuda"), ("cpu", "int8", False, "cpu"),
])
def test_the_device_a_setting_means(setting, quantization, gpu, device):
    assert resolve_device(setting, quantization, cuda_available=gpu) == device


def test_cuda_without_a_gpu_or_with_int8_says_what_to_change():
    with pytest.raises(DeviceError, match="sees no GPU: install the CUDA build of torch .*app_torch_variant"):
        resolve_device("cuda", "none", cuda_available=False)
    with pytest.raises(DeviceError, match="int8 runs on the CPU only"):
        resolve_device("cuda", "int8", cuda_available=True)


def test_settings_refuse_int8_on_cuda_and_unknown_devices(monkeypatch):
    monkeypatch.setenv("VIBE_DEVICE", "cuda")
    monkeypatch.setenv("VIBE_QUANTIZATION", "int8")
    with pytest.raises(SettingsError, match="int8 runs on the CPU only"):
        load_settings()
    monkeypatch.setenv("VIBE_DEVICE", "gpu")
    monkeypatch.setenv("VIBE_QUANTIZATION", "none")
    with pytest.raises(SettingsError, match="VIBE_DEVICE: Input should be .auto., .cpu. or .cuda."):
        load_settings()


def test_the_default_runs_on_the_cpu_here(server):
    ready = requests.get(server.url("/readyz"), timeout=10).json()
    assert ready["device"] == "cpu"
    assert 'device="auto"' in requests.get(server.url("/metrics"), timeout=10).text


def test_a_server_told_to_use_cuda_without_a_gpu_is_up_and_says_why_it_cannot_serve(tmp_path, tiny_model):
    server = Server(tmp_path, {"VIBE_MODEL_PATH": str(tiny_model), "VIBE_DEVICE": "cuda"})

    def failed():  # up, answering, and not ready: the model could not load
        response = requests.get(server.url("/readyz"), timeout=2)
        return response.status_code == 503 and response.json()["error"]["code"] == "model_failed"

    server.ready = failed
    server.start()
    try:
        answer = server.post("/predict", {"question": "hi"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_failed"
        assert "sees no GPU" in server.log() and "app_torch_variant: cuda" in server.log()
    finally:
        server.stop()
