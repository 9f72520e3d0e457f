"""The model on a GPU: run by `make test-gpu` on a machine with one (make test never collects this folder).

Without a GPU these fail at once, saying so: they are never skipped."""

import concurrent.futures
import time

import pytest
import requests

from tests.support.reference import decode_to_the_end, greedy

MODEL = "VibeThinker-1.5B"


@pytest.fixture(scope="module", autouse=True)
def a_gpu():
    import torch

    assert torch.cuda.is_available(), f"no GPU visible to torch {torch.__version__}: run make test-gpu on a GPU host"


def test_the_model_on_the_gpu_answers_as_on_the_cpu(tiny_model, reference):
    from service.inference import model
    from service.inference.batching import Batch
    from service.inference.generation import Generation, GenerationRequest

    gpu = model.load(str(tiny_model), device="cuda")
    assert gpu.device == "cuda" and next(gpu.model.parameters()).is_cuda
    questions = ["What is 17 * 23?", "a second question, longer than the first one", "third"]
    batch = Batch(gpu)
    handles = [Generation(GenerationRequest(gpu.encode_chat([{"role": "user", "content": q}]), 24,
                                            deadline=time.monotonic() + 60)) for q in questions]
    batch.admit(handles)
    while batch.filling:
        batch.fill(8)  # chunked, as the engine does while others decode
    answers = decode_to_the_end(batch)
    for question, handle in zip(questions, handles):
        assert answers[id(handle)] == greedy(reference, [{"role": "user", "content": question}], 24)[1]


def test_a_server_on_the_gpu_batches_concurrent_requests_and_samples_with_seeds(start_server):
    server = start_server(VIBE_DEVICE="cuda", VIBE_DTYPE="bfloat16")
    ready = requests.get(server.url("/readyz"), timeout=10).json()
    assert ready["device"] == "cuda" and ready["mode"] == "bfloat16"

    def ask(i):
        return server.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 64, "temperature": 0.8,
                                                    "seed": i % 4, "messages": [{"role": "user", "content": "hi"}]})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    texts = [a.json()["choices"][0]["message"]["content"] for a in answers]
    assert all(texts[i] == texts[i % 4] for i in range(16))  # a seed repeats whoever shares the batch
    sizes = [l for l in requests.get(server.url("/metrics"), timeout=10).text.splitlines()
             if l.startswith("vibethinker_batch_size_sum")]
    assert sizes and float(sizes[0].split()[1]) > 64  # rows shared steps
