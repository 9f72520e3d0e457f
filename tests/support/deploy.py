"""What the deployment tests build and call: the release to deploy, the API through the host's nginx."""

import hashlib
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import urllib3

from tests.support.servers import BIN, ROOT

SERVER_NAME = "vibethinker.test"


def build_wheel(out, version=None):
    """The project wheel, from a copy of the source tree (with `version` written into pyproject.toml)."""
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    if version:
        pyproject = src / "pyproject.toml"
        pyproject.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', pyproject.read_text(), 1))
    subprocess.run([BIN / "pip", "wheel", "-q", "--no-deps", "-w", out / "dist", src], check=True,
                   capture_output=True)
    return next((out / "dist").glob("vibethinker_service-*.whl"))


def build_release(work):
    """The project wheel and an offline wheelhouse of everything it needs, under `work`."""
    wheel = build_wheel(work / "build1")
    subprocess.run([sys.executable, ROOT / "ansible/build_wheelhouse.py", wheel, work / "wheelhouse"], check=True,
                   capture_output=True)
    return wheel, work / "wheelhouse"


def sha256(path):
    """The hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def changed_tasks(output):
    """Names of the tasks that reported a change, for failure messages."""
    chunks = output.split("TASK [")[1:]
    return [chunk.split("]", 1)[0] for chunk in chunks if "\nchanged:" in chunk]


class Api:
    """HTTPS through the host's nginx, by name (SNI), trusting the host's own certificate."""

    def __init__(self, host, cafile):
        context = ssl.create_default_context(cafile=str(cafile))
        self.pool = urllib3.HTTPSConnectionPool(host.address, host.https_port, server_hostname=SERVER_NAME,
                                                assert_hostname=SERVER_NAME, ssl_context=context, retries=False,
                                                timeout=60, maxsize=8)

    def upload(self, token, name, data):
        """POST /v1/files, a batch input file as multipart."""
        response = self.pool.request("POST", "/v1/files", headers={"Host": SERVER_NAME,
                                                                   "Authorization": f"Bearer {token}"},
                                     fields={"purpose": "batch", "file": (name, data, "application/jsonl")})
        return response.status, json.loads(response.data)

    def content(self, token, file_id):
        response = self.pool.request("GET", f"/v1/files/{file_id}/content",
                                     headers={"Host": SERVER_NAME, "Authorization": f"Bearer {token}"})
        return response.status, response.data

    def call(self, method, path, token=None, body=None):
        headers = {"Host": SERVER_NAME, "Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self.pool.request(method, path, headers=headers, body=json.dumps(body) if body else None)
        return response.status, json.loads(response.data or b"null")


def wait_ready(api, timeout=120):
    """Poll /readyz through `api` until it answers 200: its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = api.call("GET", "/readyz")
            if status == 200:
                return body
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the service did not become ready")
