"""`ansible-playbook ansible/site.yml` building a cluster (`make deploy-test-cluster`): a balancer, two app
servers and a state host, each a Debian 12 host with systemd as PID 1 (systemd-nspawn) on one private bridge.

The tests run in file order, as phases of one story: provision with one command (passwords from an
ansible-vault file), provision again (nothing changes), the firewall between the parts, TLS to PostgreSQL
and Redis with the cluster's own CA, one token and one revocation across both app servers, limits exact
across both, a key rotation reaching both, one app server stopped under load while a batch job runs, and
last runs killed while they handle secrets, and what every run left on the controller's disk.
"""

import collections
import itertools
import json
import secrets
import shlex
import subprocess
import sys
import threading
import time
import tomllib

import pytest
import urllib3

from service.settings import Settings
from tests.support.controller import controller_env, keeping, kept_files, killed_at, leftovers
from tests.support.deploy import SERVER_NAME, Api, build_release, changed_tasks, sha256, wait_ready
from tests.support.deployhost import Bridge, Host, require_tools
from tests.support.phases import phase
from tests.support.servers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.deploy, pytest.mark.cluster]

BIN = sys.executable.rsplit("/", 1)[0]
CLI = ("runuser -u vibethinker -- env VIBE_CONFIG=/etc/vibethinker/config.toml "
       "/opt/vibethinker/venv/bin/vibethinker-admin")
LAYOUT = {"vibethinker_lb": ["lb1"], "vibethinker_app": ["app1", "app2"], "vibethinker_state": ["state1"]}
NUMBERS = {"lb1": 10, "app1": 11, "app2": 12, "state1": 20}
PORT = 8000

# Run on the balancer: each call (method, url, token, body) at once in its own thread; prints [[status, body]].
CALLS = r"""
import json, threading, urllib.error, urllib.request
calls, out = json.loads(%r), {}
def one(i, method, url, token, body):
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            out[i] = [response.status, json.loads(response.read())]
    except urllib.error.HTTPError as error:
        out[i] = [error.code, json.loads(error.read() or b"null")]
threads = [threading.Thread(target=one, args=(i, *call)) for i, call in enumerate(calls)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps([out[i] for i in range(len(calls))]))
"""

# Run on an app server: an unauthenticated PING to a Redis at (address, port), in plain TCP and through TLS
# verified with the cluster's CA; prints each reply (or the error), one per line.
REDIS_PING = """
import socket, ssl, sys
address, port = sys.argv[1], int(sys.argv[2])
def ping(wrap):
    try:
        with wrap(socket.create_connection((address, port), timeout=3)) as conn:
            conn.sendall(b"PING\\r\\n")
            return repr(conn.recv(128).decode())
    except OSError as exc:
        return type(exc).__name__
tls = ssl.create_default_context(cafile="/etc/vibethinker/cluster-ca.pem")
print(ping(lambda conn: conn))
print(ping(lambda conn: tls.wrap_socket(conn, server_hostname=address)))
"""

# Run on an app server, the password on standard input: psql to the state host with `sslmode`; prints
# whether its own connection is encrypted ("t").
PSQL = ('read -r PGPASSWORD; export PGPASSWORD; psql "host={host} dbname=vibethinker user=vibethinker '
        'sslmode={mode} sslrootcert=/etc/vibethinker/cluster-ca.pem connect_timeout=5" '
        '-Atc "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"')


def on_balancer(cluster, calls):
    """Send `calls` [(method, app server name, path, token, body)] from the balancer straight to app servers,
    all at once: [(status, body)] in order."""
    spelled = [(method, f"http://{cluster['hosts'][name].address}:{PORT}{path}", token, body)
               for method, name, path, token, body in calls]
    result = cluster["hosts"]["lb1"].ssh("python3 -", input=CALLS % json.dumps(spelled), timeout=600)
    return [tuple(item) for item in json.loads(result.stdout)]


def cli(cluster, name, args):
    return cluster["hosts"][name].ssh(f"{CLI} {args}").stdout.strip().splitlines()


def playbook(cluster, variables, *extra):
    """Run site.yml against the cluster, every temporary file the controller makes kept (for the last
    test): (recap counts summed over the hosts, full output)."""
    work = cluster["work"]
    result = subprocess.run(keeping(site(work, variables, *extra)), capture_output=True, text=True, timeout=1800,
                            env=controller_env(work))
    runs = sorted(work.glob("playbook-*.log"))
    (work / f"playbook-{len(runs) + 1}.log").write_text(result.stdout + result.stderr)
    recap = result.stdout.split("PLAY RECAP")[-1]
    if result.returncode != 0 or "PLAY RECAP" not in result.stdout:
        failures = "\n".join(line for line in result.stdout.splitlines() if line.startswith(("fatal:", "failed:")))
        journals = "".join(f"--- {name} ---\n" + host.ssh("journalctl -p warning -n 30 --no-pager",
                                                           check=False).stdout
                           for name, host in cluster["hosts"].items())
        raise AssertionError(failures[-6000:] + "\n" + result.stdout[-3000:] + result.stderr[-2000:] + journals)
    counts = {}
    for line in recap.splitlines():
        for key, value in (part.split("=") for part in line.split(":", 1)[-1].split() if "=" in part):
            counts[key] = counts.get(key, 0) + int(value)
    return counts, result.stdout


def site(work, variables, *extra):
    """ansible-playbook's command line for site.yml with this cluster's inventory, vault and `variables`
    (written to vars.json for it)."""
    (work / "vars.json").write_text(json.dumps(variables))
    return [f"{BIN}/ansible-playbook", "-i", work / "inventory.ini", ROOT / "ansible/site.yml",
            "-e", f"@{work / 'vars.json'}", "-e", f"@{work / 'vault.yml'}", "--vault-password-file",
            work / "vault-password", *extra]


def vault(cluster):
    """The vault's variables, decrypted."""
    shown = subprocess.run([f"{BIN}/ansible-vault", "view", "--vault-password-file",
                            cluster["work"] / "vault-password", cluster["work"] / "vault.yml"],
                           capture_output=True, text=True, check=True, env={"HOME": str(cluster["work"])})
    return dict(line.split(": ", 1) for line in shown.stdout.splitlines())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    """Four booted hosts on one bridge, the builds, the vault, and the variables of the first deployment."""
    work = tmp_path_factory.mktemp("cluster")
    with phase("cluster: build the wheel and the offline wheelhouse"):
        require_tools()
        wheel, wheelhouse = build_release(work)
    bridge = Bridge()
    hosts = {}
    try:
        with phase("cluster: boot four Debian 12 hosts on one bridge"):
            for name, number in NUMBERS.items():
                (work / name).mkdir()
                hosts[name] = Host(work / name, bridge=bridge, number=number, name=name).boot()
        inventory = "".join(f"[{group}]\n" + "".join(hosts[n].inventory_line(n) for n in names) + "\n"
                            for group, names in LAYOUT.items())
        (work / "inventory.ini").write_text(inventory)
        (work / "vault-password").write_text(secrets.token_urlsafe(24))
        (work / "vault.yml").write_text(f"vault_db_password: {secrets.token_urlsafe(24)}\n"
                                        f"vault_redis_password: {secrets.token_urlsafe(24)}\n")
        subprocess.run([f"{BIN}/ansible-vault", "encrypt", "--vault-password-file", work / "vault-password",
                        work / "vault.yml"], check=True, capture_output=True, env={"HOME": str(work)})
        variables = {
            "app_wheel": str(wheel), "app_install_mode": "offline", "app_wheelhouse": str(wheelhouse),
            "app_dtype": "float32", "app_model_name": "vibethinker-demo", "app_memory_max": "3G",
            "app_settings": {"torch_threads": 1, "max_new_tokens_limit": 2048, "default_max_new_tokens": 32,
                             "batch_lease_s": 10, "request_deadline_s": 300, "stream_deadline_s": 300},
            "model_source": "local", "model_local_dir": str(tiny_model),
            "model_sha256": {name: sha256(tiny_model / name) for name in ("config.json", "model.safetensors")},
            "base_apt_proxy": hosts["lb1"].proxy_url, "nginx_server_name": SERVER_NAME,
            "nginx_admin_allow": [bridge.gateway], "nginx_metrics_allow": [bridge.gateway],
        }
        yield {"hosts": hosts, "work": work, "vars": variables, "bridge": bridge}
    finally:
        with phase("cluster: tear the hosts down"):
            left = {name: host.stop() for name, host in hosts.items()}
            bridge.remove()
        assert not any(left.values()), f"processes left behind: {left}"


@pytest.fixture(scope="module")
def provisioned(cluster):
    """The first run of the playbook on the four fresh hosts."""
    with phase("cluster: first run of site.yml (four fresh hosts)"):
        counts, output = playbook(cluster, cluster["vars"])
    assert counts["failed"] == 0 and counts["changed"] > 0
    cert = cluster["work"] / "cert.pem"
    cert.write_text(cluster["hosts"]["lb1"].ssh("cat /etc/ssl/vibethinker/cert.pem").stdout)
    cluster["api"] = Api(cluster["hosts"]["lb1"], cert)
    cluster["admin_token"] = cluster["hosts"]["app1"].ssh("cat /root/vibethinker-admin-token").stdout.strip()
    cluster["first_output"] = output
    return cluster


def test_a_second_run_changes_nothing(provisioned):
    with phase("cluster: second run of site.yml (idempotence)"):
        counts, output = playbook(provisioned, provisioned["vars"])
    assert counts["changed"] == 0 and counts["failed"] == 0, changed_tasks(output)


def test_passwords_and_keys_never_show_and_each_part_is_where_it_belongs(provisioned):
    hosts, output = provisioned["hosts"], provisioned["first_output"]
    for password in vault(provisioned).values():
        assert password not in output
    key = hosts["app1"].ssh("cat /var/lib/vibethinker/keys/*.pem").stdout
    assert "PRIVATE KEY" in key and key.split("\n")[1] not in output
    assert hosts["app2"].ssh("cat /var/lib/vibethinker/keys/*.pem").stdout == key  # one key set
    assert hosts["app1"].ssh("ls /var/lib/vibethinker").stdout.split().count("vibethinker.db") == 0  # PostgreSQL
    for name in ("lb1", "state1"):
        assert hosts[name].ssh("test -e /opt/vibethinker/venv", check=False).returncode != 0, name
    assert hosts["app1"].ssh("systemctl is-enabled vibethinker-backup.timer", check=False).stdout.strip() == "enabled"
    assert hosts["app2"].ssh("systemctl is-enabled vibethinker-backup.timer", check=False).stdout.strip() \
        == "disabled"


def test_the_firewall_lets_each_part_reach_only_what_it_needs(provisioned):
    hosts = provisioned["hosts"]
    for name, port in (("app1", PORT), ("app2", PORT), ("state1", 5432), ("state1", 6379), ("state1", 6380)):
        with pytest.raises((OSError, urllib3.exceptions.HTTPError)):  # from here (not a balancer): dropped
            urllib3.PoolManager(retries=False).request("GET", f"http://{hosts[name].address}:{port}/", timeout=3)
    [(status, body)] = on_balancer(provisioned, [("GET", "app2", "/readyz", "", None)])
    assert status == 200 and body["status"] == "ready", body
    # An app server reaches both of the state host's Redis instances through TLS only, and each asks for its
    # password.
    for port in (6379, 6380):
        plain, tls = hosts["app2"].ssh(f"python3 - {hosts['state1'].address} {port}", input=REDIS_PING).stdout.split("\n")[:2]
        assert "NOAUTH" not in plain and "PONG" not in plain, (port, plain)  # a plaintext client gets nothing
        assert tls.startswith("'-NOAUTH"), (port, tls)


def test_traffic_to_the_state_host_is_tls_verified_with_the_clusters_own_ca(provisioned):
    hosts, password = provisioned["hosts"], vault(provisioned)["vault_db_password"]
    state = hosts["state1"].address
    for name in ("app1", "app2"):
        psql = {mode: hosts[name].ssh(PSQL.format(host=state, mode=mode), input=password + "\n", check=False)
                for mode in ("disable", "verify-full")}
        assert psql["disable"].returncode != 0 and "no encryption" in psql["disable"].stderr, psql["disable"]
        assert psql["verify-full"].stdout.strip() == "t", psql["verify-full"].stderr
        config = tomllib.loads(hosts[name].ssh("cat /etc/vibethinker/config.toml").stdout)
        assert config["db_url"].endswith("?sslmode=verify-full&sslrootcert=/etc/vibethinker/cluster-ca.pem")
        for key in ("ratelimit_storage_uri", "cache_storage_uri"):
            assert config[key].startswith("rediss://") and config[key].endswith(
                "/0?ssl_check_hostname=true&ssl_ca_certs=/etc/vibethinker/cluster-ca.pem"), key
    # The state host's certificate names its private address; the CA's key is on the state host only.
    san = hosts["state1"].ssh("openssl x509 -in /etc/vibethinker-ca/server.pem -noout -ext subjectAltName").stdout
    assert f"IP Address:{state}" in san, san
    ca_key = hosts["state1"].ssh("cat /etc/vibethinker-ca/ca.key").stdout
    assert "PRIVATE KEY" in ca_key
    assert hosts["state1"].ssh("stat -c '%a %U' /etc/vibethinker-ca /etc/vibethinker-ca/ca.key").stdout.split() \
        == ["700", "root", "600", "root"]
    line = ca_key.splitlines()[1]
    for name in ("lb1", "app1", "app2"):
        found = hosts[name].ssh(f"grep -rlF -e {shlex.quote(line)} /etc /root /var/lib /home /srv /tmp",
                             check=False)
        assert found.stdout == "", (name, found.stdout)
    assert hosts["app1"].ssh("cat /etc/vibethinker/cluster-ca.pem").stdout == \
        hosts["state1"].ssh("cat /etc/vibethinker-ca/ca.pem").stdout


def test_the_cache_has_a_redis_of_its_own_on_the_state_host_that_evicts(provisioned):
    hosts = provisioned["hosts"]
    password = vault(provisioned)["vault_redis_password"]
    auth = f"REDISCLI_AUTH={shlex.quote(password)} redis-cli --no-auth-warning"
    for socket, policy in (("/run/redis/redis.sock", "noeviction"),
                           ("/run/redis-cache/redis-server-cache.sock", "allkeys-lru")):
        reply = hosts["state1"].ssh(f"{auth} -s {socket} CONFIG GET maxmemory-policy").stdout.split()
        assert reply == ["maxmemory-policy", policy], (socket, reply)
    state = hosts["state1"].address
    for name in ("app1", "app2"):
        config = tomllib.loads(hosts[name].ssh("cat /etc/vibethinker/config.toml").stdout)
        assert f"@{state}:6379/0?" in config["ratelimit_storage_uri"], name
        assert f"@{state}:6380/0?" in config["cache_storage_uri"], name  # the cache reuses the password


def test_a_token_and_its_revocation_hold_on_every_app_server(provisioned):
    with phase("cluster: a token issued on app1, revoked on app2"):
        cli(provisioned, "app1", "users add alice")
        issued = cli(provisioned, "app1", "tokens issue alice --label cluster-test")
        token, jti = issued[-1], issued[0].split()[2]
        answers = on_balancer(provisioned, [("GET", name, "/v1/me", token, None) for name in ("app1", "app2")])
        assert [status for status, _ in answers] == [200, 200], answers
        status, answer = provisioned["api"].call("POST", "/v1/predict", token, {"question": "2+2?",
                                                                              "max_new_tokens": 4})
        assert status == 200 and answer["success"] is True, answer
        cli(provisioned, "app2", f"tokens revoke {jti}")
        answers = on_balancer(provisioned, [("GET", name, "/v1/me", token, None) for name in ("app1", "app2")])
        assert [(status, body["error"]["code"]) for status, body in answers] == [(401, "token_revoked")] * 2


def test_rate_limits_and_concurrency_caps_are_exact_across_app_servers(provisioned, long_question):
    with phase("cluster: limits across both app servers"):
        cli(provisioned, "app1", "users add bob --rate-limit 4/minute --max-concurrent 20")
        bob = cli(provisioned, "app2", "tokens issue bob")[-1]
        calls = [("POST", "app1" if i % 2 else "app2", "/v1/predict", bob, {"question": "hi", "max_new_tokens": 1})
                 for i in range(8)]
        codes = sorted(body["error"]["code"] if status != 200 else "ok"
                       for status, body in on_balancer(provisioned, calls))
        assert codes == ["ok"] * 4 + ["rate_limit_exceeded"] * 4, codes
        cli(provisioned, "app1", "users add carol --max-concurrent 2")
        carol = cli(provisioned, "app1", "tokens issue carol")[-1]
        long = {"question": long_question, "max_new_tokens": 1024, "temperature": 0}
        answers = on_balancer(provisioned, [("POST", name, "/v1/predict", carol, long)
                                            for name in ("app1", "app2", "app1", "app2")])
        codes = sorted(body["error"]["code"] if status != 200 else "ok" for status, body in answers)
        assert codes == ["concurrency_limit_exceeded"] * 2 + ["ok"] * 2, answers
        cli(provisioned, "app2", "users add dave --max-concurrent 20")
        dave = cli(provisioned, "app2", "tokens issue dave")[-1]
        short = {"question": "hi", "max_new_tokens": 1}
        [(status, first)] = on_balancer(provisioned, [("POST", "app1", "/v1/predict", dave, short)])
        cost = first["usage"]["total_tokens"]  # every such request costs the same
        cli(provisioned, "app1", f"users set dave --daily-tokens {3 * cost}")  # room for two more today
        answers = on_balancer(provisioned, [("POST", "app1" if i % 2 else "app2", "/v1/predict", dave, short)
                                            for i in range(6)])
        codes = sorted(body["error"]["code"] if status != 200 else "ok" for status, body in answers)
    assert codes == ["daily_token_quota_exceeded"] * 4 + ["ok"] * 2, answers


def test_a_key_rotation_and_retirement_reach_every_app_server(provisioned):
    hosts = provisioned["hosts"]
    [old] = json.loads(hosts["app1"].ssh(f"{CLI} --json keys list").stdout)
    signed_by_old = cli(provisioned, "app2", "tokens issue admin --scope generate")[-1]
    with phase("cluster: site.yml -e app_keys_rotate=true -e app_keys_retire=[the old key]"):
        counts, _ = playbook(provisioned, {**provisioned["vars"], "app_keys_rotate": True, "app_keys_retire": [old]})
    assert counts["failed"] == 0 and counts["changed"] > 0
    keys = [json.loads(hosts[name].ssh(f"{CLI} --json keys list").stdout) for name in ("app1", "app2")]
    assert keys[0] == keys[1] and len(keys[0]) == 1 and keys[0] != [old], keys
    token = cli(provisioned, "app1", "tokens issue admin --scope generate")[-1]  # signed by the new key
    answers = on_balancer(provisioned, [("GET", name, "/v1/me", t, None) for t in (token, signed_by_old)
                                        for name in ("app1", "app2")])
    assert [status for status, _ in answers] == [200, 200, 401, 401], answers


def test_the_nightly_backup_on_the_primary_dumps_the_shared_database(provisioned):
    app1 = provisioned["hosts"]["app1"]
    with phase("cluster: the nightly backup (pg_dump from app1)"):
        run = app1.ssh("systemctl start vibethinker-backup.service", check=False)  # oneshot: waits for it
        journal = app1.ssh("journalctl -u vibethinker-backup.service --no-pager -n 20", check=False).stdout
    assert run.returncode == 0, run.stderr + journal
    assert "backed up the postgresql database" in journal, journal
    listing = app1.ssh("stat -c '%a %U %s' /var/lib/vibethinker-backups/vibethinker-*").stdout.split()
    assert listing[:2] == ["600", "vibethinker"] and int(listing[2]) > 0, listing


def test_stopping_an_app_server_fails_only_its_requests_and_a_batch_still_completes(provisioned, long_question):
    hosts, api = provisioned["hosts"], provisioned["api"]
    cli(provisioned, "app1", "users add erin --max-concurrent 20 --rate-limit 1000/minute")
    admin = cli(provisioned, "app1", "tokens issue erin")[-1]
    lines = "".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/predict", "body": {
        "question": long_question, "max_new_tokens": 256, "temperature": 0}}) + "\n" for i in range(12))
    status, uploaded = api.upload(admin, "cluster.jsonl", lines.encode())
    assert status == 200, uploaded
    status, batch = api.call("POST", "/v1/batches", admin, {"input_file_id": uploaded["id"],
                                                             "endpoint": "/v1/predict", "completion_window": "24h"})
    assert status == 200, batch
    results, killed, seeds = [], threading.Event(), itertools.count()

    # Clients that ask again and again until the server is dead and a moment after: the balancer sends every
    # other request to app2, so requests are in flight there when it dies, whatever this machine's speed
    # (one run of six one-shot requests had all finished before the kill). Each a long greedy answer (the
    # default system prompt given, as long_question was chosen with it: without it the answer ends at
    # about 90 tokens) that is never a cache hit (its own seed is part of the cache key; /v1/predict takes
    # none), and a pause after a failure, so no client spins into a rate limit.
    messages = [{"role": "system", "content": Settings().default_system_prompt},
                {"role": "user", "content": long_question}]

    def ask():
        while True:
            try:
                results.append(api.call("POST", "/v1/chat/completions", admin, {
                    "model": "vibethinker-demo", "messages": messages, "max_tokens": 2000, "temperature": 0,
                    "seed": next(seeds)}))
            except urllib3.exceptions.HTTPError as exc:  # a failure is a result here
                results.append((0, repr(exc)))
            if killed.wait(0) and time.monotonic() > killed.after:
                return
            if results[-1][0] != 200:
                time.sleep(0.5)

    with phase("cluster: app2 killed under load, a batch running"):
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        # The server dies (every process of the service's user killed: gunicorn's master, its worker, the
        # document readers; `systemctl kill` fails in a container), and stays down.
        hosts["app2"].ssh("pkill -KILL -u vibethinker; systemctl stop vibethinker")
        killed.after = time.monotonic() + 2
        killed.set()
        for thread in threads:
            thread.join(300)
        after = [api.call("POST", "/v1/predict", admin, {"question": "hi", "max_new_tokens": 2}) for _ in range(4)]
        deadline = time.monotonic() + 300
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, batch
            time.sleep(1)
            batch = api.call("GET", f"/v1/batches/{batch['id']}", admin)[1]
    kinds = collections.Counter("ok" if status == 200 else body["error"]["code"] if isinstance(body, dict) else body
                                for status, body in results)
    assert set(kinds) == {"ok", "bad_gateway"}, (kinds, results)  # app2's requests failed (JSON 502), app1's went on
    assert {body["usage"]["completion_tokens"] for status, body in results if status == 200} == {2000}
    assert [status for status, _ in after] == [200] * 4, after
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 12, batch
    output = [json.loads(line) for line in api.content(admin, batch["output_file_id"])[1].splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(f"b{i}" for i in range(12))  # each exactly once
    hosts["app2"].ssh("systemctl start vibethinker")
    wait_ready(api)


# Tasks that handle a secret, at which a run is killed: the cache's password (state host), the settings
# with every password (app servers), the signing keys read from app1 and written on app2.
SECRET_TASKS = ("redis : Write the cache instance's configuration", "app : Write the service settings",
                "app : Write the signing keys")


def test_no_secret_reaches_the_controllers_disk_even_when_a_run_is_killed(provisioned):
    hosts, work = provisioned["hosts"], provisioned["work"]
    for task in SECRET_TASKS:
        with phase(f"cluster: site.yml killed at {task!r}"):
            output = killed_at(site(work, provisioned["vars"]), controller_env(work), task)
        (work / f"killed-{SECRET_TASKS.index(task)}.log").write_text(output)
    keys = hosts["app1"].ssh("ls /var/lib/vibethinker/keys/").stdout.split()
    found = {**vault(provisioned), "admin token": provisioned["admin_token"],
             "CA key": hosts["state1"].ssh("cat /etc/vibethinker-ca/ca.key").stdout,
             "server key": hosts["state1"].ssh("cat /etc/vibethinker-ca/server.key").stdout,
             **{key: hosts["app1"].ssh(f"cat /var/lib/vibethinker/keys/{key}").stdout for key in keys}}
    certificates = [hosts["state1"].ssh(f"cat /etc/vibethinker-ca/{name}").stdout for name in ("ca.pem", "server.pem")]
    assert keys and kept_files(work), kept_files(work)  # every earlier run kept all its temporary files
    assert leftovers(work, found, public=certificates) == []
    # The CA's certificate did pass through the controller (copied to the app servers): the scan sees it.
    assert leftovers(work, {"CA certificate": certificates[0]}) != []
