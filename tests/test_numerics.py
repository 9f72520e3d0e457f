"""Numeric modes: int8 quantisation and its pre-converted folder, float32 prefill for bfloat16, CPU feature
detection; int8 behind gunicorn."""

import json
import os
import shutil

import openai
import pytest
import requests
import torch

from bench.modes import weight_bytes  # what a decode step reads
from service.inference import artifact, int8kernel, model, numerics
from tests.support.reference import greedy
from tests.support.servers import admin_cli, clean_env


@pytest.fixture(scope="module")
def int8(tiny_model):
    """The int8 mode on fbgemm's kernel (test_int8kernel.py has the own kernel's)."""
    return model.load(str(tiny_model), quantization="int8", int8_kernel="fbgemm")


def test_bf16_units_are_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\n\nprocessor\t: 1\n")
    assert not numerics.cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert numerics.cpu_has_bf16(cpuinfo)
    assert not numerics.cpu_has_bf16(tmp_path / "missing")
    assert not numerics.cpu_has_vnni(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert numerics.cpu_has_vnni(cpuinfo) and not numerics.cpu_has_bf16(cpuinfo)


@pytest.mark.parametrize("setting, dtype, expected", [
    ("on", "bfloat16", True), ("off", "bfloat16", False), ("on", "float32", False),
    ("auto", "float32", False), ("auto", "bfloat16", not numerics.cpu_has_bf16()),
])
def test_float32_prefill_setting(setting, dtype, expected):
    assert numerics.wants_float32_prefill(setting, dtype) is expected


def test_int8_quantises_every_decoder_linear_and_the_head(int8, reference):
    quantized = torch.ao.nn.quantized.dynamic.Linear
    linears = [m for m in int8.model.model.layers.modules() if isinstance(m, (torch.nn.Linear, quantized))]
    assert linears and all(isinstance(m, numerics.Int8Linear) for m in linears)
    assert isinstance(int8.model.lm_head, numerics.Int8Linear)
    # 8-bit activations exactly where fbgemm cannot saturate
    assert all(m.full_range is numerics.cpu_has_vnni() for m in [*linears, int8.model.lm_head])
    assert int8.mode == "int8" and not int8.float32_prefill
    # a step reads the int8 layers and head: under a third of float32's bytes (the embedding is one row)
    assert weight_bytes(int8.model) < weight_bytes(reference.model) / 3


def test_int8_keeps_most_top1_choices_of_float32(int8, reference):
    ids = reference.encode_chat([{"role": "user", "content": "What is 17 * 23? Show the steps."}])
    ids += greedy(reference, [{"role": "user", "content": "What is 17 * 23? Show the steps."}], 48)[1]
    with torch.inference_mode():
        ours = int8.model(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
        theirs = reference.model(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
    agreement = (ours == theirs).float().mean().item()
    assert 0.5 < agreement  # tiny random weights are harsh on int8 (bench/modes.py has the figures)


def test_int8_activation_range_decides_the_error():
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 512)
    dense.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    layer = numerics.Int8Linear.from_float(dense)
    x = torch.randn(4, 256) * 3
    errors = {}
    for full_range in (False, True):
        layer.full_range = full_range
        with torch.inference_mode():
            errors[full_range] = ((layer(x) - dense(x)).norm() / dense(x).norm()).item()
    assert errors[False] < 0.05
    if numerics.cpu_has_vnni():  # 8 bits of activation: about half the error of fbgemm's default 7
        assert errors[True] < 0.7 * errors[False]


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    proc = admin_cli(clean_env(), "model", "convert", tiny_model, out, "--quantization", "int8")
    assert str(out) in proc.stdout.splitlines()[-1]
    return out


@pytest.mark.parametrize("kernel", ["fbgemm", "own"])
def test_a_converted_folder_loads_the_same_int8_model(converted, int8, tiny_model, kernel):
    # the folder was converted on whichever kernel `auto` picked here; it loads on either
    loaded = model.load(str(converted), quantization="int8", int8_kernel=kernel)
    if loaded.int8_kernel == "own":  # where it can run: the same as converting at load on it
        int8 = model.load(str(tiny_model), quantization="int8", int8_kernel="own")
    layer = int8kernel.OwnInt8Linear if loaded.int8_kernel == "own" else numerics.Int8Linear
    assert loaded.mode == "int8" and isinstance(loaded.model.lm_head, layer)
    assert json.loads((converted / artifact.MARKER).read_text())["quantization"] == "int8"
    ids = torch.tensor([int8.encode_chat([{"role": "user", "content": "Is 91 prime?"}])])
    with torch.inference_mode():
        assert torch.equal(loaded.model(input_ids=ids).logits, int8.model(input_ids=ids).logits)
    assert loaded.encode_chat([{"role": "user", "content": "hi"}]) == int8.encode_chat([{"role": "user",
                                                                                          "content": "hi"}])
    assert loaded.eos_ids == int8.eos_ids and loaded.context_length == int8.context_length


def test_a_converted_folder_refuses_another_mode(converted):
    with pytest.raises(ValueError, match="pre-converted int8 model: set quantization = int8"):
        model.load(str(converted), dtype="bfloat16")


def test_convert_refuses_what_it_cannot_do_and_leaves_nothing_behind(converted, tiny_model, tmp_path):
    (tmp_path / "notes").mkdir()
    cases = [((converted, tmp_path / "again"), "is already converted"),
             ((tmp_path / "nothing", tmp_path / "out"), "is not a model folder"),
             ((tiny_model, tmp_path / "notes"), "not a converted model folder")]
    for (source, out), message in cases:
        proc = admin_cli(clean_env(), "model", "convert", source, out, "--quantization", "int8", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_convert_again_changes_nothing_until_the_source_changes(tiny_model, tmp_path):
    source, out = tmp_path / "model", tmp_path / "int8"
    shutil.copytree(tiny_model, source)

    def convert():
        proc = admin_cli(clean_env(), "--json", "model", "convert", source, out, "--quantization", "int8")
        return json.loads(proc.stdout)["written"]

    source.chmod(0o750)
    assert convert() is True
    first = (out / artifact.WEIGHTS).stat().st_mtime_ns
    # as readable as the source, for a service running as another user (safetensors alone writes 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct((source / "config.json").stat().st_mode
                                                                          & 0o777)}
    assert out.stat().st_mode & 0o777 == 0o750
    assert convert() is False and (out / artifact.WEIGHTS).stat().st_mtime_ns == first
    os.utime(source / "model.safetensors", ns=(first + 10**9, first + 10**9))  # as a copy of new weights does
    assert convert() is True and (out / artifact.WEIGHTS).stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8", "model"]  # no partial or old folder left
    assert model.load(str(out), quantization="int8").mode == "int8"


def test_float32_matmuls_upcast_bf16_linears_and_restore_them(tiny_model):
    bf16 = model.load(str(tiny_model), dtype="bfloat16", prefill_float32="on")
    assert bf16.float32_prefill
    ids = torch.tensor([bf16.encode_chat([{"role": "user", "content": "upcast me"}])])
    layer = bf16.model.model.layers[0].mlp.up_proj
    seen = []
    hook = torch.nn.functional.linear
    try:
        torch.nn.functional.linear = lambda x, w, b=None: (seen.append((x.dtype, w.dtype)), hook(x, w, b))[1]
        with torch.inference_mode(), bf16.prefill_mode():
            upcast = bf16.model(input_ids=ids).logits
        seen_inside, seen[:] = list(seen), []
        with torch.inference_mode():
            plain = bf16.model(input_ids=ids).logits
    finally:
        torch.nn.functional.linear = hook
    assert seen_inside and all(pair == (torch.float32, torch.float32) for pair in seen_inside)
    assert "forward" not in vars(layer)  # the instance override is gone
    assert upcast.dtype == plain.dtype == torch.bfloat16
    assert (upcast.float() - plain.float()).abs().max() < 0.25 * plain.float().abs().max()


def test_the_int8_service_answers_chat_completions(start_server, converted):
    server = start_server(VIBE_QUANTIZATION="int8", VIBE_MODEL_PATH=converted)
    ready = requests.get(server.url("/readyz"), timeout=5).json()
    assert ready["mode"] == "int8"
    with openai.OpenAI(base_url=server.url("/v1"), api_key=server.token, max_retries=0, timeout=60) as client:
        answer = client.chat.completions.create(model="VibeThinker-1.5B", max_tokens=12, temperature=0,
                                                messages=[{"role": "user", "content": "What is 6 * 7?"}])
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    assert answer.choices[0].message.content
