"""ansible/ passes ansible-lint's production profile and the syntax check, copies no unit or site file, and
renders what each layout needs (two Redis instances: counters that never evict, a cache that does)."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from service.settings import Settings
from tests.support.servers import ROOT

BIN = Path(sys.executable).parent


def test_ansible_lint_production_profile_passes():
    result = subprocess.run([BIN / "ansible-lint", "--nocolor"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in result.stderr


def test_the_playbook_passes_the_syntax_check():
    result = subprocess.run([BIN / "ansible-playbook", "-i", "ansible/inventory.example.ini", "ansible/site.yml",
                             "--syntax-check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_units_and_nginx_sites_come_from_their_own_folders():
    copies = [p for p in (ROOT / "ansible").rglob("*")
              if p.suffix in (".service", ".socket") or "vibethinker.conf" in p.name]
    assert copies == []
    for path, source in (("roles/app/vars/main.yml", "systemd/vibethinker.service"),
                         ("roles/nginx/tasks/main.yml", "nginx/vibethinker.conf.j2")):
        assert source in (ROOT / "ansible" / path).read_text()


# --- What the roles render, in both layouts -------------------------------------------------------------------------
# Each role's templates rendered by ansible-playbook itself on this machine (connection local, nothing installed),
# with what that role sees on a server: a stand-in role holding the real role's defaults/ and vars/ (linked), beside
# a playbook that has the real group_vars/, so each variable comes from where it does in a deployment.
LAYOUTS = {
    "one": "[vibethinker]\napi ansible_host=10.0.0.5\n",
    "cluster": "[vibethinker_lb]\nlb1 ansible_host=10.0.0.10\n[vibethinker_app]\napp1 ansible_host=10.0.0.11\n"
               "app2 ansible_host=10.0.0.12\n[vibethinker_state]\nstate1 ansible_host=10.0.0.20\n",
}
# Passwords that need urlencoding (a cluster's vault): the counters', and the cache's own or (None) theirs reused.
COUNTERS_PASSWORD = "counters/pass:word@0123456789+"
CACHE_PASSWORD = "cache-pass/word#0123456789"
# The cluster's front and its console's sign-in through the organisation's provider.
CLUSTER_CONSOLE = {"nginx_server_name": "api.example.org", "nginx_https_port": 8443,
                   "app_console_oidc_issuer": "https://login.example.org/realms/staff",
                   "app_console_oidc_client_id": "vibethinker-console", "app_console_oidc_client_secret": "oidc-s3cret",
                   "app_console_oidc_admins": {"alice@example.org": "alice", "bob\"@example.org": "bob"},
                   # Budget alerts to a webhook whose URL holds a token (from the vault), at the service's address.
                   "app_alert_targets": ["json://10.4.0.10/hooks/vibethinker?token=alert-s3cret"],
                   "app_alert_thresholds": [50, 100], "app_alert_ip_allow": ["10.0.0.53", "10.4.0.10"]}
# role: (the hosts whose play runs it in site.yml, the templates it renders)
RENDERED = {"redis": ("vibethinker_state:vibethinker", ["redis-cache.conf"]),
            "app": ("vibethinker_app:vibethinker", ["config.toml", "site.conf"]),
            "base": ("all", ["nftables.conf"])}
RENDER_TASK = """- name: Render the role's templates
  ansible.builtin.template:
    src: "{templates}/{{{{ item }}}}.j2"
    dest: "{out}/{{{{ inventory_hostname }}}}-{{{{ item }}}}"
    mode: "0600"
  loop: {names}
"""


def render(work, layout, cache_password=None):
    """Every host's rendered files of `layout`: {"HOST-FILE": text}."""
    out, roles = work / "out", ROOT / "ansible/roles"
    out.mkdir()
    plays = []
    for role, (hosts, names) in RENDERED.items():
        (work / "roles" / role / "tasks").mkdir(parents=True)
        for folder in ("defaults", "vars"):
            if (roles / role / folder).is_dir():
                (work / "roles" / role / folder).symlink_to(roles / role / folder)
        (work / "roles" / role / "tasks/main.yml").write_text(
            RENDER_TASK.format(templates=roles / role / "templates", out=out, names=json.dumps(names)))
        plays.append({"name": f"Render role {role}", "hosts": hosts, "gather_facts": False, "roles": [role]})
    (work / "render.yml").write_text(yaml.safe_dump(plays))
    (work / "group_vars").symlink_to(ROOT / "ansible/group_vars")
    (work / "inventory.ini").write_text(LAYOUTS[layout] + "[all:vars]\nansible_connection=local\n"
                                        f"ansible_python_interpreter={sys.executable}\n")
    secrets = {"vault_redis_password": COUNTERS_PASSWORD, "vault_db_password": "db-password-0123456789",
               **CLUSTER_CONSOLE} if layout == "cluster" else {}
    if cache_password:
        secrets["vault_redis_cache_password"] = cache_password
    (work / "vault.json").write_text(json.dumps(secrets))
    result = subprocess.run([BIN / "ansible-playbook", "-i", work / "inventory.ini", work / "render.yml",
                             "-e", f"@{work / 'vault.json'}"], capture_output=True, text=True, cwd=work,
                            env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(work), "ANSIBLE_NOCOLOR": "1",
                                 "ANSIBLE_LOCAL_TEMP": str(work / "tmp"), "LANG": "C.UTF-8"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return {path.name: path.read_text() for path in out.iterdir()}


def redis_conf(text):
    """A Redis config's directives: {name: value}, the last one winning."""
    lines = (line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


@pytest.fixture(scope="module", params=[("one", None), ("cluster", None), ("cluster", CACHE_PASSWORD)],
                ids=["one-server", "cluster", "cluster-own-cache-password"])
def rendered(request, tmp_path_factory):
    layout, cache_password = request.param
    return layout, cache_password, render(tmp_path_factory.mktemp(f"render-{layout}"), layout, cache_password)


def test_the_counters_redis_refuses_writes_when_full_and_never_evicts():
    tasks = yaml.safe_load((ROOT / "ansible/roles/redis/tasks/main.yml").read_text())
    [configure] = [t for t in tasks if t["name"] == "Configure Redis for the service"]
    settings = {item["key"]: item["value"] for item in configure["loop"]}
    assert settings["maxmemory-policy"] == "noeviction"
    assert settings["appendonly"] != "no"  # the counters persist; the cache below does not
    assert settings["port"] == 0  # never plaintext TCP: a cluster's is TLS only
    [tls] = [t for t in tasks if t["name"] == "Serve Redis over TLS only"]
    assert {item["key"] for item in tls["loop"]} >= {"tls-port", "tls-cert-file", "tls-key-file", "tls-ca-cert-file"}


def test_the_cache_redis_evicts_least_recently_used_keeps_nothing_and_has_files_of_its_own(rendered):
    layout, cache_password, files = rendered
    conf = redis_conf(files[f"{'state1' if layout == 'cluster' else 'api'}-redis-cache.conf"])
    assert conf["maxmemory-policy"] == "allkeys-lru" and conf["maxmemory"] == "256mb"
    assert conf["save"] == '""' and conf["appendonly"] == "no"
    # Debian's redis-server@cache.service: PIDFile=/run/redis-cache/redis-server.pid, RuntimeDirectory=redis-cache.
    assert conf["pidfile"] == "/run/redis-cache/redis-server.pid"
    assert conf["unixsocket"].startswith("/run/redis-cache/") and conf["unixsocketperm"] == "770"
    assert conf["logfile"] != "/var/log/redis/redis-server.log" and conf["dbfilename"] != "dump.rdb"
    if layout == "cluster":
        assert conf["port"] == "0" and conf["tls-port"] == "6380" and conf["bind"].split()[-1] == "10.0.0.20"
        assert conf["tls-ca-cert-file"] == "/etc/redis/tls/ca.pem" and conf["tls-auth-clients"] == "no"
        assert conf["requirepass"] == (cache_password or COUNTERS_PASSWORD)
    else:
        assert conf["port"] == "0" and "requirepass" not in conf


def test_the_service_gets_a_cache_storage_apart_from_the_counters(rendered):
    layout, cache_password, files = rendered
    for host in ("app1", "app2") if layout == "cluster" else ("api",):
        config = tomllib.loads(files[f"{host}-config.toml"])
        counters, cache = config["ratelimit_storage_uri"], config["cache_storage_uri"]
        assert cache != counters
        if layout == "cluster":
            verified = "?ssl_check_hostname=true&ssl_ca_certs=/etc/vibethinker/cluster-ca.pem"
            assert counters == f"rediss://:{quote(COUNTERS_PASSWORD, safe='')}@10.0.0.20:6379/0{verified}"
            assert cache == f"rediss://:{quote(cache_password or COUNTERS_PASSWORD, safe='')}@10.0.0.20:6380/0{verified}"
            assert config["db_url"].endswith("/vibethinker?sslmode=verify-full&sslrootcert="
                                             "/etc/vibethinker/cluster-ca.pem")
            assert "redis-server@cache" not in files[f"{host}-site.conf"]
        else:
            assert counters == "redis+unix:///run/redis/redis.sock"
            assert cache.startswith("redis+unix:///run/redis-cache/")
            assert "After=redis-server@cache.service" in files[f"{host}-site.conf"]
            assert "SupplementaryGroups=redis" in files[f"{host}-site.conf"]


def test_the_state_hosts_firewall_lets_only_the_app_servers_reach_both_redis_ports(rendered):
    layout, _, files = rendered
    if layout == "one":
        assert "dport 6380" not in files["api-nftables.conf"] and "dport 6379" not in files["api-nftables.conf"]
        return
    state = files["state1-nftables.conf"]
    for port in (5432, 6379, 6380):
        assert f"ip saddr {{ 10.0.0.11, 10.0.0.12 }} tcp dport {port} accept" in state, state
    for host in ("lb1", "app1", "app2"):
        assert "dport 6380" not in files[f"{host}-nftables.conf"]


def test_long_answers_may_run_to_the_models_recommended_length_at_the_measured_speed(rendered):
    layout, _, files = rendered
    for host in ("app1", "app2") if layout == "cluster" else ("api",):
        config = tomllib.loads(files[f"{host}-config.toml"])
        assert config["max_new_tokens_limit"] == 40960  # a number, not a string
        assert config["stream_deadline_s"] == 10240  # 40,960 tokens at 5 tokens/s, and a quarter more
        assert "request_deadline_s" not in config  # whole answers keep the service's 60 s


def test_the_console_knows_its_address_and_the_organisations_provider(rendered):
    layout, _, files = rendered
    for host in ("app1", "app2") if layout == "cluster" else ("api",):
        config = tomllib.loads(files[f"{host}-config.toml"])
        if layout == "one":
            assert config["console_url"] == "https://api"  # the front's name: the inventory's by default
            assert not [key for key in config if key.startswith("console_oidc")]
            continue
        assert config["console_url"] == "https://api.example.org:8443"
        assert config["console_oidc_issuer"] == "https://login.example.org/realms/staff"
        assert config["console_oidc_client_secret"] == "oidc-s3cret" and config["console_oidc_claim"] == "email"
        assert config["console_oidc_admins"] == CLUSTER_CONSOLE["app_console_oidc_admins"]
        settings = Settings(**{k: v for k, v in config.items() if k.startswith("console_")})
        assert settings.console_base == "https://api.example.org:8443"
        assert settings.console_oidc_admins["bob\"@example.org"] == "bob"


def test_budget_alerts_reach_their_targets_and_nothing_else(rendered):
    layout, _, files = rendered
    for host in ("app1", "app2") if layout == "cluster" else ("api",):
        config, unit = tomllib.loads(files[f"{host}-config.toml"]), files[f"{host}-site.conf"]
        assert config["transcript_retention"] == "30d"
        if layout == "one":  # no targets: no alerts, and the unit keeps its private network
            assert "alert_targets" not in config and "PrivateNetwork" not in unit
            continue
        settings = Settings(**{k: v for k, v in config.items() if k.startswith("alert_")})
        assert settings.alert_targets == CLUSTER_CONSOLE["app_alert_targets"] and settings.alert_thresholds == [50, 100]
        allowed = next(line for line in unit.splitlines() if line.startswith("IPAddressAllow="))
        assert allowed.split("=", 1)[1].split()[-2:] == ["10.0.0.53", "10.4.0.10"]


def tasks_of(node):
    """Every task in a task list, blocks opened."""
    for task in node or []:
        yield task
        for key in ("block", "rescue", "always"):
            yield from tasks_of(task.get(key))


def test_no_task_that_handles_a_secret_writes_it_through_the_controllers_disk():
    """`copy` with content and `template` write their text to a controller temp file first (README, "No
    secret on the controller's disk"): a task hiding its values (no_log) writes with secret_file instead."""
    hidden = []
    for path in sorted((ROOT / "ansible/roles").glob("*/tasks/*.yml")):
        for task in tasks_of(yaml.safe_load(path.read_text())):
            if not task.get("no_log"):
                continue
            hidden.append(task["name"])
            copy = task.get("ansible.builtin.copy") or task.get("copy") or {}
            assert "content" not in copy and not {"ansible.builtin.template", "template"} & set(task), \
                f"{path.relative_to(ROOT)}: {task['name']}"
    assert {"Write the service settings", "Write the signing keys", "Install the given private key",
            "Write the cache instance's configuration"} <= set(hidden)

