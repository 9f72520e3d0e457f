"""The README's examples run as printed (against a test server's address)."""

import json
import re
import subprocess
import sys

import requests

from tests.support.servers import BIN, ROOT

README = (ROOT / "README.md").read_text()


def shell_blocks():
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def run_python_example(server, marker, timeout):
    """The README's first Python example holding `marker` (None: its first), run against `server` as printed."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    block = next(b for b in blocks if marker is None or marker in b)
    code = block.replace("http://127.0.0.1:8000", server.base)
    return subprocess.run([sys.executable, "-c", f"TOKEN = {server.token!r}\n" + code], capture_output=True,
                          text=True, timeout=timeout)


def test_quick_start_is_two_commands():
    first = shell_blocks()[0]
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make run", "make test"]


def test_curl_example_works_as_printed(server):
    block = next(b for b in shell_blocks() if b.lstrip().startswith("curl"))
    command = block.replace("http://127.0.0.1:8000", server.base)
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True,
                         env={**server.env, "TOKEN": server.token})
    body = json.loads(out.stdout)
    assert body["success"] is True and body["input"] == "What is 12 * 34?"
    assert body["usage"]["completion_tokens"] <= 64


def test_error_example_is_what_the_service_says(server):
    example = json.loads(re.search(r"```json\n(.*?)```", README, flags=re.S).group(1))
    response = server.post("/predict", {"question": "a", "max_new_tokens": 4096})
    assert response.json() == example


def test_admins_day_runs_as_printed(start_server):
    server = start_server()  # its own: the example retires the first key
    block = next(b for b in shell_blocks() if "vibethinker-admin users add team-math" in b)
    command = "set -euo pipefail\n" + block.replace("http://127.0.0.1:8000", server.base)
    env = {**server.env, "PATH": f"{BIN}:{server.env['PATH']}"}
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    me = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert me["user"] == "team-math" and me["limits"]["daily_tokens"] == 200000
    assert "\n401\n" in out.stdout
    assert "disabled team-math" in out.stdout and "retire:" in out.stdout
    assert "key.retire" in out.stdout  # the audit listing shows it
    assert server.get("/v1/me").status_code == 401  # the admin's own token was signed with the retired key


def test_the_batch_example_runs_as_printed(server):
    out = run_python_example(server, "batches.create", timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.startswith("problem-")]
    assert [line.split()[0] for line in answers] == [f"problem-{i}" for i in range(30)]
    assert "completed 30 of 30" in out.stdout


def test_openai_example_runs_as_printed(server):
    out = run_python_example(server, None, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_the_two_model_configuration_is_valid_settings(tmp_path, monkeypatch):
    from service.settings import load_settings

    block = next(b for b in re.findall(r"```toml\n(.*?)```", README, flags=re.S) if "[[routing]]" in b)
    (tmp_path / "config.toml").write_text(block)
    monkeypatch.setenv("VIBE_CONFIG", str(tmp_path / "config.toml"))
    settings = load_settings()
    assert [m.name for m in settings.served_models()] == ["VibeThinker-1.5B", "code-model"]
    assert [r.model for r in settings.routing] == ["code-model", "code-model"] and settings.cache == "user"


def test_the_document_examples_run_as_printed(server, tmp_path):
    from tests.support import makedocs

    (tmp_path / "problem.pdf").write_bytes(makedocs.text_pdf())
    (tmp_path / "equation.png").write_bytes(makedocs.png())
    block = next(b for b in shell_blocks() if "-F file=@problem.pdf" in b)
    out = subprocess.run(["bash", "-c", block.replace("http://127.0.0.1:8000", server.base)], capture_output=True,
                         text=True, timeout=120, check=True, env={**server.env, "TOKEN": server.token}, cwd=tmp_path)
    shown = json.loads(re.search(r'"document": (\{.*?\})\n', README).group(1))
    assert json.loads(out.stdout)["document"] == shown
    code = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "image_url" in b)
    out = subprocess.run([sys.executable, "-c", f"TOKEN = {server.token!r}\n" +
                          code.replace("http://127.0.0.1:8000", server.base)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    typed = server.post("/v1/chat/completions", {"model": "VibeThinker-1.5B", "max_tokens": 64, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "Solve this:\n\n"
                                                               + makedocs.EQUATION}]}).json()
    assert out.stdout.split(" ", 1) == [str(typed["usage"]["prompt_tokens"]),
                                        typed["choices"][0]["message"]["content"] + "\n"]


def test_the_reasoning_examples_run_as_printed(thinking_server):
    from tests.support.thinking import ANSWER, THOUGHT

    block = next(b for b in shell_blocks() if '"expected_answer"' in b)
    out = subprocess.run(["bash", "-c", block.replace("http://127.0.0.1:8000", thinking_server.base)],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={**thinking_server.env, "TOKEN": thinking_server.token})
    shown = json.loads(next(b for b in re.findall(r"```json\n(.*?)```", README, flags=re.S) if '"correct"' in b))
    answer = json.loads(out.stdout)
    assert {name: answer[name] for name in shown} == shown
    out = run_python_example(thinking_server, "reasoning_content", timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == [f"thinking: {THOUGHT.strip()}", f"answer: {ANSWER.strip()}", "final: x=3 correct: True"]
    assert lines[3].startswith("thinking tokens: ") and int(lines[3].split()[-1]) > 0
    streamed = out.stdout.split("\n", 4)[4]  # the thinking's pieces in brackets, then the answer's
    assert streamed.startswith("[") and streamed.replace("[", "").replace("]", "") == THOUGHT + ANSWER


def test_the_thinking_example_runs_as_printed(server):
    out = run_python_example(server, "reasoning_effort", timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("choice ")] == ["0", "1", "2", "3"]
    assert any(line.startswith("vote: {") and "'share'" in line for line in lines)
    assert any(line.startswith("forced tokens: ") for line in lines)


def test_the_console_section_shows_a_screenshot_and_its_link_command_works(server):
    image = re.search(r"!\[[^]]*\]\((tests/data/[^)]+\.png)\)", README)
    assert image and (ROOT / image.group(1)).read_bytes().startswith(b"\x89PNG")
    block = next(b for b in shell_blocks() if b.strip().startswith("vibethinker-admin console-link"))
    command = block.strip().replace("vibethinker-admin", str(BIN / "vibethinker-admin")).replace(" admin", " root")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True,
                         env=server.env, cwd=ROOT)
    url = out.stdout.strip().splitlines()[-1]
    assert url.startswith(server.base + "/admin/console/login/link/")
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and 'id="continue"' in page.text
