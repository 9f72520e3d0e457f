"""What the bench scripts alone share: the demo model, a running service with a token, stopping it all.

What the tests use too (a free port, Redis, nginx, slow clients) lives in tests/support.
"""

import os
import shutil
import subprocess
import sys
import time

import requests

from tests.support.servers import BIN, ROOT


def wait_ready(url, timeout=120):
    """Poll `url` until it answers 200 (or 405, for a POST-only route)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code in (200, 405):
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def build_demo_model(out, preset="tiny"):
    subprocess.run([sys.executable, "-m", "service.demo_model", str(out), "--preset", preset], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return out


def cached_demo_model(preset):
    """The preset's random-weight model under var/, built on first use (the full size takes minutes and 3.1 GB);
    one built before its preset's chat template changed gets the template (its int8 conversion too)."""
    from service import demo_model

    out = ROOT / "var" / ("bench-tiny" if preset == "tiny" else "bench-model")
    if not (out / "config.json").is_file():
        return build_demo_model(out, preset)
    for folder in (out, out.with_name(out.name + "-int8")):
        if (folder / "tokenizer_config.json").is_file():
            demo_model.set_template(folder, demo_model.template_of(preset))
    return out


def start_service(work, model_dir, port, user_options, **settings):
    """Real gunicorn on 127.0.0.1:port with state under `work`, and a token for user `bench`.

    `user_options` go to `vibethinker-admin users add bench`; `settings` are VIBE_* variables.
    Returns (process, Authorization headers).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIBE_")}
    env.update(VIBE_MODEL_PATH=str(model_dir), VIBE_DB_URL=f"sqlite:///{work}/db.sqlite",
               VIBE_JWT_KEY_DIR=str(work / "keys"), VIBE_BIND=f"127.0.0.1:{port}", **settings)

    def admin(*argv):
        return subprocess.run([str(BIN / "vibethinker-admin"), *argv], env=env, check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]

    admin("keys", "generate")
    admin("users", "add", "bench", *user_options)
    token = admin("tokens", "issue", "bench")
    proc = subprocess.Popen([str(BIN / "gunicorn"), "-c", "service/gunicorn_conf.py", "service.app:create_app()"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/readyz")
    return proc, {"Authorization": f"Bearer {token}"}


def stop_all(procs, work):
    """Stop the processes a bench started (the last started first) and remove its work folder."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)
