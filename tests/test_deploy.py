"""`ansible-playbook ansible/site.yml` against a real Debian 12 host with systemd as PID 1 (`make deploy-test`).

The host is booted here with systemd-nspawn in its own network namespace
(tests/support/deployhost.py). The tests run in file order, as phases of one story:
provision, provision again (nothing changes), check mode, use the API through
nginx, restart, upgrade, and last what the runs left on the controller's disk. Each phase's duration is
printed at the end of the run.
"""

import json
import re
import secrets
import shlex
import shutil
import subprocess
import time
import tomllib
from urllib.parse import urlsplit

import pytest
import urllib3

from tests.support import makedocs
from tests.support.controller import controller_env, keeping, kept_files, leftovers
from tests.support.deploy import (SERVER_NAME, Api, build_release, build_wheel, changed_tasks, sha256,
                                   wait_ready)
from tests.support.deployhost import make_host, require_tools
from tests.support.nginx import certificate_pair
from tests.support.phases import phase
from tests.support.servers import BIN, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

CLI = ("runuser -u vibethinker -- env VIBE_CONFIG=/etc/vibethinker/config.toml "
       "/opt/vibethinker/venv/bin/vibethinker-admin")
# Two Redis instances (role redis): the counters' (redis-server.service) and the response cache's
# (redis-server@cache.service).
COUNTERS_SOCKET = "/run/redis/redis.sock"
CACHE_SOCKET = "/run/redis-cache/redis-server-cache.sock"


def playbook(host, workdir, variables, *extra):
    """Run site.yml against the host (secrets from the encrypted vault; every temporary file the controller
    makes kept, for `test_no_secret_reached_the_controllers_disk`): (recap counts, full output)."""
    (workdir / "vars.json").write_text(json.dumps(variables))
    inventory = host.inventory(workdir / "inventory.ini")
    result = subprocess.run(
        keeping(["ansible-playbook", "-i", inventory, ROOT / "ansible/site.yml", "-e", f"@{workdir / 'vars.json'}",
                 "-e", f"@{workdir / 'vault.yml'}", "--vault-password-file", workdir / "vault-password", *extra]),
        capture_output=True, text=True, timeout=host.playbook_timeout_s, env=controller_env(workdir))
    recap = re.search(r"testhost\s*:\s*(.*)", result.stdout.split("PLAY RECAP")[-1])
    if result.returncode != 0 or not recap:  # the service's own account is often the reason
        journal = host.ssh("journalctl -u vibethinker -n 40 --no-pager", check=False).stdout
        raise AssertionError(result.stdout[-6000:] + result.stderr[-2000:] + "\n--- service journal ---\n" + journal)
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}
    return counts, result.stdout


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model):
    """A booted host, the builds to deploy, and the variables of the first deployment."""
    work = tmp_path_factory.mktemp("deploy")
    with phase("deploy: build the wheel and the offline wheelhouse"):
        require_tools()
        wheel, wheelhouse = build_release(work)
    hub = work / "hub"
    shutil.copytree(tiny_model, hub / "local/tiny/r1")
    host = make_host(work / "host", hub_root=hub)
    (work / "host").mkdir()
    try:
        with phase(f"deploy: boot the Debian 12 host ({type(host).__name__})"):
            host.boot()
        # The site's own TLS certificate; its key only in the encrypted vault (as the README says to do).
        certificate, tls_key = certificate_pair(SERVER_NAME)
        (work / "vault-password").write_text(secrets.token_urlsafe(24))
        (work / "vault.yml").write_text(json.dumps({"vault_nginx_tls_private_key": tls_key}))
        subprocess.run([BIN / "ansible-vault", "encrypt", "--vault-password-file", work / "vault-password",
                        work / "vault.yml"], check=True, capture_output=True, env={"HOME": str(work)})
        variables = {
            "app_wheel": str(wheel), "app_install_mode": "offline", "app_wheelhouse": str(wheelhouse),
            "app_dtype": "float32", "app_model_name": "vibethinker-demo", "app_memory_max": "3G",
            "app_settings": {"torch_threads": 1, "max_new_tokens_limit": 64, "default_max_new_tokens": 32},
            "model_source": "local", "model_local_dir": str(tiny_model),
            "model_sha256": {name: sha256(tiny_model / name) for name in ("config.json", "model.safetensors")},
            "base_apt_proxy": host.proxy_url, "nginx_server_name": SERVER_NAME,
            "nginx_admin_allow": [host.gateway], "nginx_metrics_allow": [host.gateway],
            "nginx_tls_certificate": certificate, "nginx_tls_private_key": "{{ vault_nginx_tls_private_key }}",
        }
        yield {"host": host, "work": work, "vars": variables, "hub": hub, "tls_key": tls_key}
    finally:
        with phase("deploy: tear the host down"):
            left = host.stop()
        assert left == [], f"processes left behind: {left}"


@pytest.fixture(scope="module")
def provisioned(deployment):
    """The first run of the playbook on the fresh host."""
    with phase("deploy: first run of site.yml (fresh host)"):
        counts, output = playbook(deployment["host"], deployment["work"], deployment["vars"])
    assert counts["failed"] == 0 and counts["changed"] > 0
    deployment["first_output"] = output
    host = deployment["host"]
    cert = deployment["work"] / "cert.pem"
    cert.write_text(host.ssh("cat /etc/ssl/vibethinker/cert.pem").stdout)
    deployment["api"] = Api(host, cert)
    deployment["admin_token"] = host.ssh("cat /root/vibethinker-admin-token").stdout.strip()
    return deployment


def test_a_second_run_changes_nothing(provisioned):
    with phase("deploy: second run of site.yml (idempotence)"):
        counts, output = playbook(provisioned["host"], provisioned["work"], provisioned["vars"])
    assert counts["changed"] == 0 and counts["failed"] == 0, changed_tasks(output)


def test_check_mode_reports_no_changes(provisioned):
    with phase("deploy: site.yml --check --diff"):
        counts, output = playbook(provisioned["host"], provisioned["work"], provisioned["vars"], "--check", "--diff")
    assert counts["changed"] == 0 and counts["failed"] == 0, changed_tasks(output)


def test_the_admin_token_is_root_only_and_never_printed(provisioned):
    host, token = provisioned["host"], provisioned["admin_token"]
    assert host.ssh("stat -c '%a %U %G' /root/vibethinker-admin-token").stdout.split() == ["600", "root", "root"]
    assert token.count(".") == 2
    assert token not in provisioned["first_output"]
    assert host.ssh("stat -c '%a %U' /var/lib/vibethinker/keys").stdout.split() == ["700", "vibethinker"]
    assert host.ssh("stat -c '%a %U %G' /etc/vibethinker/config.toml").stdout.split() == ["640", "root", "vibethinker"]


def test_the_api_answers_through_nginx_and_revocation_works(provisioned):
    host, api, admin = provisioned["host"], provisioned["api"], provisioned["admin_token"]
    with phase("deploy: API through nginx (token issue, predict)"):
        status, me = api.call("GET", "/v1/me", admin)
        assert status == 200 and me["user"] == "admin", me
        host.ssh(f"{CLI} users add alice")
        issued = host.ssh(f"{CLI} tokens issue alice --label deploy-test").stdout.strip().splitlines()
        token, jti = issued[-1], issued[0].split()[2]
        status, answer = api.call("POST", "/v1/predict", token, {"question": "What is 2+2?", "max_new_tokens": 8})
        assert status == 200 and answer["success"] is True, answer
        assert answer["usage"]["completion_tokens"] == 8 or answer["finish_reason"] == "stop"
    with phase("deploy: a photo read by OCR in the hardened unit"):
        image = {"type": "image_url", "image_url": {"url": makedocs.data_url(makedocs.png(), "image/png")}}
        asked = {"model": answer["model"], "max_tokens": 2, "temperature": 0}
        status, read = api.call("POST", "/v1/chat/completions", token, {**asked, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Solve:"}, image]}]})
        assert status == 200, read
        status, typed = api.call("POST", "/v1/chat/completions", token, {**asked, "messages": [
            {"role": "user", "content": f"Solve:\n\n{makedocs.EQUATION}"}]})
        assert status == 200 and read["usage"]["prompt_tokens"] == typed["usage"]["prompt_tokens"], (read, typed)
    with phase("deploy: the admins' console, its pages and assets from the wheel"):
        url = host.ssh(f"{CLI} console-link admin").stdout.strip().splitlines()[-1]
        path = urlsplit(url).path
        assert url.startswith(f"https://{SERVER_NAME}") and path.startswith("/admin/console/login/link/"), url
        page = api.pool.request("GET", path, headers={"Host": SERVER_NAME})
        assert page.status == 200 and b'id="continue"' in page.data, page.data[:300]
        css = api.pool.request("GET", "/admin/console/static/console.css", headers={"Host": SERVER_NAME})
        assert css.status == 200 and b".chart .bar" in css.data
    with phase("deploy: revoke"):
        revoked = host.ssh(f"{CLI} tokens revoke {jti}")
        assert "warning" not in revoked.stderr, revoked.stderr  # the CLI told the workers, through Redis
        status, refused = api.call("POST", "/v1/predict", token, {"question": "again?"})
        assert status == 401 and refused["error"]["code"] == "token_revoked", refused
        # A second token for alice, to check it survives the upgrade.
        provisioned["alice_token"] = host.ssh(f"{CLI} tokens issue alice").stdout.strip().splitlines()[-1]
        provisioned["revoked_token"] = token


def redis_cli(host, socket, command):
    """redis-cli on the host, on the Redis at `socket`: its reply's lines."""
    return host.ssh(f"redis-cli -s {socket} {command}").stdout.splitlines()


def test_the_cache_has_a_redis_of_its_own_that_evicts_and_the_counters_one_never_does(provisioned):
    host = provisioned["host"]
    assert host.ssh("systemctl is-enabled redis-server@cache").stdout.strip() == "enabled"
    assert host.ssh("systemctl is-active redis-server redis-server@cache").stdout.split() == ["active", "active"]
    assert redis_cli(host, COUNTERS_SOCKET, "CONFIG GET maxmemory-policy") == ["maxmemory-policy", "noeviction"]
    assert redis_cli(host, CACHE_SOCKET, "CONFIG GET maxmemory-policy") == ["maxmemory-policy", "allkeys-lru"]
    assert redis_cli(host, CACHE_SOCKET, "CONFIG GET maxmemory") == ["maxmemory", str(256 << 20)]
    assert redis_cli(host, CACHE_SOCKET, "CONFIG GET save") == ["save", ""]  # a cache: nothing on disk
    assert redis_cli(host, CACHE_SOCKET, "CONFIG GET appendonly") == ["appendonly", "no"]
    assert redis_cli(host, CACHE_SOCKET, "CONFIG GET port") == ["port", "0"]  # one server: the socket only
    assert host.ssh(f"stat -c '%a %U %G' {CACHE_SOCKET}").stdout.split() == ["770", "redis", "redis"]
    assert host.ssh("stat -c '%a %U %G' /etc/redis/redis-cache.conf").stdout.split() == ["640", "redis", "redis"]
    # The service's user reaches it (group redis), as it does the counters' socket.
    assert host.ssh(f"runuser -u vibethinker -- redis-cli -s {CACHE_SOCKET} PING").stdout.strip() == "PONG"
    config = tomllib.loads(host.ssh("cat /etc/vibethinker/config.toml").stdout)
    assert config["ratelimit_storage_uri"] == f"redis+unix://{COUNTERS_SOCKET}"
    assert config["cache_storage_uri"] == f"redis+unix://{CACHE_SOCKET}"


def test_answers_are_cached_in_the_cache_redis_never_beside_the_counters(provisioned):
    host, api, admin = provisioned["host"], provisioned["api"], provisioned["admin_token"]
    greedy = {"question": "Cached where?", "max_new_tokens": 2, "temperature": 0}  # deterministic: cached
    for _ in range(2):
        status, answer = api.call("POST", "/v1/predict", admin, greedy)
        assert status == 200, answer
    pattern = shlex.quote("vibethinker:answer:*")
    assert redis_cli(host, CACHE_SOCKET, f"--scan --pattern {pattern}") != []
    assert redis_cli(host, COUNTERS_SOCKET, f"--scan --pattern {pattern}") == []


def test_the_firewall_drops_ports_that_are_not_listed(provisioned):
    host = provisioned["host"]
    host.ssh("systemd-run --unit=probe-8081 python3 -m http.server 8081 --bind 0.0.0.0")
    try:
        assert host.ssh("python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081')\"",
                        check=False).returncode == 0, "the probe server is not up inside the host"
        # Dropped: the connection times out (or, through qemu's port forward, is cut).
        with pytest.raises((OSError, urllib3.exceptions.HTTPError)):
            urllib3.PoolManager(retries=False).request("GET", f"http://{host.address}:{host.probe_port}/", timeout=3)
    finally:
        host.ssh("systemctl stop probe-8081", check=False)
    assert "policy drop" in host.ssh("nft list chain inet filter input").stdout


def test_restart_brings_the_service_back_and_the_unit_is_hardened(provisioned):
    host, api = provisioned["host"], provisioned["api"]
    with phase("deploy: systemctl restart and systemd-analyze security"):
        host.ssh("systemctl restart vibethinker")
        assert "Active: active (running)" in host.ssh("systemctl status vibethinker --no-pager").stdout
        assert wait_ready(api)["status"] == "ready"
        exposure = host.ssh("systemd-analyze security vibethinker --no-pager").stdout
    level = float(re.search(r"Overall exposure level for vibethinker\.service: ([\d.]+)", exposure).group(1))
    assert level <= 2.0, exposure[-3000:]


def test_the_nightly_backup_timer_is_on_and_its_run_leaves_a_private_consistent_backup(provisioned):
    host = provisioned["host"]
    with phase("deploy: the nightly backup"):
        assert host.ssh("systemctl is-enabled vibethinker-backup.timer").stdout.strip() == "enabled"
        assert host.ssh("systemctl is-active vibethinker-backup.timer").stdout.strip() == "active"
        run = host.ssh("systemctl start vibethinker-backup.service", check=False)  # oneshot: waits for it
        journal = host.ssh("journalctl -u vibethinker-backup.service --no-pager -n 40", check=False).stdout
        assert run.returncode == 0, run.stderr + journal
        assert "backed up the sqlite database" in journal, journal
        listing = host.ssh("stat -c '%a %U %n' /var/lib/vibethinker-backups/vibethinker-*.sqlite").stdout.split()
        assert listing[:2] == ["600", "vibethinker"] and len(listing) == 3, listing
        check = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                 "print(c.execute('PRAGMA integrity_check').fetchone()[0], "
                 "sorted(r[0] for r in c.execute('SELECT name FROM users')))")
        out = host.ssh(f"python3 -c \"{check}\" {listing[2]}").stdout
    assert out.startswith("ok") and "'alice'" in out, out


def finished_batch(api, token):
    """A batch of two lines, run to its end: (its id, its output file's bytes)."""
    lines = "".join(json.dumps({"custom_id": f"u{i}", "method": "POST", "url": "/v1/predict",
                                "body": {"question": f"{i} + {i}?", "max_new_tokens": 2}}) + "\n" for i in range(2))
    status, uploaded = api.upload(token, "lines.jsonl", lines.encode())
    assert status == 200, uploaded
    status, batch = api.call("POST", "/v1/batches", token, {"input_file_id": uploaded["id"],
                                                              "endpoint": "/v1/predict", "completion_window": "24h"})
    assert status == 200, batch
    deadline = time.monotonic() + 120
    while batch["status"] not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = api.call("GET", f"/v1/batches/{batch['id']}", token)[1]
    assert batch["status"] == "completed", batch
    return batch["id"], api.content(token, batch["output_file_id"])[1]


def test_an_upgrade_keeps_users_tokens_and_revocations(provisioned, second_model):
    host, api, work = provisioned["host"], provisioned["api"], provisioned["work"]
    upgraded = dict(provisioned["vars"])
    with phase("deploy: a batch job and usage rows to keep"):
        batch_id, batch_output = finished_batch(api, provisioned["alice_token"])
        usage_before = json.loads(host.ssh(f"{CLI} --json usage").stdout)
    with phase("deploy: build the next version"):
        upgraded["app_wheel"] = str(build_wheel(work / "build2", version="0.1.0.post1"))
    # The new build also takes the model from a hub (a local stand-in) at a pinned revision.
    hub_files = sorted(p.name for p in (provisioned["hub"] / "local/tiny/r1").iterdir())
    # And it turns int8 on: the play converts the model on the server and the service loads that folder.
    upgraded.update(model_source="hub", model_dir="/opt/vibethinker/model-hub", app_quantization="int8",
                    model_hub_endpoint=f"{host.proxy_url}/hub", model_hub_repo="local/tiny", model_hub_revision="r1",
                    model_files=[{"name": n, "sha256": sha256(provisioned["hub"] / "local/tiny/r1" / n)}
                                 for n in hub_files])
    # And a second model, routed to by the question.
    upgraded.update(app_extra_models=[{"name": "code-model", "dir": "/opt/vibethinker/models/code",
                                       "local_dir": str(second_model), "aliases": ["coder"],
                                       "sha256": {"model.safetensors": sha256(second_model / "model.safetensors")}}],
                    app_routing=[{"model": "code-model", "regex": "(?i)\\bpython\\b"}], app_model_aliases=["demo"])
    keys_before = host.ssh(f"{CLI} --json keys list").stdout
    with phase("deploy: upgrade run of site.yml"):
        counts, output = playbook(host, work, upgraded)
    assert counts["changed"] > 0 and counts["failed"] == 0
    ready = wait_ready(api)
    assert ready["version"] == "0.1.0.post1" and ready["mode"] == "int8", ready
    config = host.ssh("cat /etc/vibethinker/config.toml").stdout
    assert 'path = "/opt/vibethinker/model-hub-int8"' in config and 'quantization = "int8"' in config, config
    assert config.count("[[models]]") == 2 and "model_path" not in config and "[[routing]]" in config, config
    assert [m["name"] for m in ready["models"]] == ["vibethinker-demo", "code-model"], ready
    assert host.ssh(f"{CLI} --json keys list").stdout == keys_before  # the signing key is never replaced
    users = json.loads(host.ssh(f"{CLI} --json users list").stdout)
    assert {"admin", "alice"} <= {u["name"] for u in users}
    question = {"question": "1+1?", "max_new_tokens": 4}
    status, answer = api.call("POST", "/v1/predict", provisioned["alice_token"], question)
    assert status == 200 and answer["model"] == "vibethinker-demo", answer
    status, routed = api.call("POST", "/v1/predict", provisioned["alice_token"], {**question, "question": "Python?"})
    assert status == 200 and routed["model"] == "code-model", routed
    status, refused = api.call("POST", "/v1/predict", provisioned["revoked_token"], {"question": "1+1?"})
    assert status == 401 and refused["error"]["code"] == "token_revoked"
    status, batch = api.call("GET", f"/v1/batches/{batch_id}", provisioned["alice_token"])
    assert status == 200 and batch["status"] == "completed", batch
    assert api.content(provisioned["alice_token"], batch["output_file_id"])[1] == batch_output
    usage_after = {(row["day"], row["user"]): row for row in json.loads(host.ssh(f"{CLI} --json usage").stdout)}
    for row in usage_before:  # every usage row is still counted (and the upgrade's requests added)
        assert usage_after[(row["day"], row["user"])]["requests"] >= row["requests"], (row, usage_after)
    with phase("deploy: second run after the upgrade (idempotence)"):
        counts, output = playbook(host, work, upgraded)
    assert counts["changed"] == 0, changed_tasks(output)


# Run as a reader instance (a drop-in on vibethinker-reader@probe.service: the unit's own sandbox, another
# command): what it can reach of the service's keys, database and network.
READER_PROBE = """
import os, socket, sys
def tried(what, attempt):
    try:
        attempt()
        print(what, "REACHED")
    except OSError as exc:
        print(what, type(exc).__name__)
tried("keys", lambda: os.listdir(sys.argv[1]))
tried("database", lambda: open(sys.argv[2], "rb").read(16))
tried("network", lambda: socket.create_connection(("127.0.0.1", 22), timeout=3))
"""


def test_a_reader_cannot_reach_the_keys_the_database_or_the_network_and_its_unit_is_hardened(provisioned):
    host = provisioned["host"]
    with phase("deploy: inside a document reader's unit"):
        config = host.ssh("cat /etc/vibethinker/config.toml").stdout
        database = re.search(r'db_url = "sqlite:///([^"]+)"', config).group(1)
        assert 'document_reader_socket = "/run/vibethinker-reader.sock"' in config, config
        assert host.ssh(f"test -f {database} && ls /var/lib/vibethinker/keys").stdout.strip()  # there, for root
        assert host.ssh("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 22), 3)\"",
                        check=False).returncode == 0  # and the network is there outside the reader
        host.ssh("cat > /usr/local/lib/vibethinker-reader-probe.py", input=READER_PROBE)
        host.ssh("mkdir -p /run/systemd/system/vibethinker-reader@probe.service.d")
        host.ssh("cat > /run/systemd/system/vibethinker-reader@probe.service.d/probe.conf", input=(
            "[Service]\nType=oneshot\nStandardInput=null\nStandardOutput=journal\nExecStart=\n"
            "ExecStart=/opt/vibethinker/venv/bin/python /usr/local/lib/vibethinker-reader-probe.py "
            f"/var/lib/vibethinker/keys {database}\n"))
        host.ssh("systemctl daemon-reload && systemctl start vibethinker-reader@probe.service")
        seen = host.ssh("journalctl -u vibethinker-reader@probe.service -o cat --no-pager").stdout
        exposure = host.ssh("systemd-analyze security vibethinker-reader@x.service --no-pager").stdout
    found = dict(line.split(" ", 1) for line in seen.splitlines() if line.split(" ", 1)[0] in
                 ("keys", "database", "network"))
    assert set(found) == {"keys", "database", "network"} and "REACHED" not in found.values(), seen
    level = float(re.search(r"Overall exposure level for vibethinker-reader@x\.service: ([\d.]+)",
                            exposure).group(1))
    assert level <= 2.0, exposure[-3000:]


def test_no_secret_reached_the_controllers_disk(provisioned):
    """Every run above kept every temporary file the controller made (tests/support/controller.py): as if
    each had been killed at each of its moments. None holds the TLS key, a signing key or the admin token."""
    host, work = provisioned["host"], provisioned["work"]
    found = {"TLS key": provisioned["tls_key"], "admin token": provisioned["admin_token"],
             **{f"signing key {n}": host.ssh(f"cat {path}").stdout
                for n, path in enumerate(host.ssh("ls /var/lib/vibethinker/keys/*.pem").stdout.split())}}
    assert host.ssh("cat /etc/ssl/vibethinker/key.pem").stdout.strip() == provisioned["tls_key"].strip()
    assert len(found) >= 3 and kept_files(work), kept_files(work)
    assert leftovers(work, found) == []

