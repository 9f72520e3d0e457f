"""A real Debian 12 host for deployment tests: debootstrap, booted by systemd-nspawn, in its own netns.

The host gets its own network namespace joined to this machine by a veth pair,
so its firewall, nginx and sshd are its own and touch nothing here. It reaches
Debian's mirror through `MirrorProxy`, a small HTTP proxy on our end of the
veth that forwards only to that mirror; it also serves a local stand-in for the
model hub. Nothing else leaves this machine.
"""

import hashlib
import http.client
import http.server
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

CACHE = Path(os.environ.get("VIBE_DEPLOY_CACHE", "/var/cache/vibethinker-deploy"))
MIRROR = "deb.debian.org"
SUITE = "bookworm"
PACKAGES = "systemd-sysv,dbus,openssh-server,python3,python3-apt,sudo,ca-certificates,iproute2,procps"
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE]
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "ip": "iproute2",
              "ssh": "openssh-client", "ssh-keygen": "openssh-client"}


def require_tools():
    """Install what booting a test host needs (Debian, as root), or fail saying what is missing."""
    if os.geteuid() != 0:
        raise RuntimeError("the deployment test boots a container with systemd-nspawn: run it as root")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", RUNLEVEL="1")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def base_rootfs():
    """A pristine Debian 12 root filesystem, built once and cached (about 75-140 s the first time)."""
    key = hashlib.sha256(" ".join(DEBOOTSTRAP + [MIRROR]).encode()).hexdigest()[:12]
    root = CACHE / f"{SUITE}-{key}"
    if (root / "etc/os-release").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f".partial-{key}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([*DEBOOTSTRAP, str(partial), f"http://{MIRROR}/debian"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial.rename(root)
    return root


class MirrorProxy(http.server.ThreadingHTTPServer):
    """Forwards apt's plain-HTTP GETs to Debian's mirror only; serves `hub_root` under /hub/."""

    daemon_threads = True

    def __init__(self, address, hub_root=None):
        super().__init__(address, _ProxyHandler)
        self.hub_root = hub_root
        self.forwarded = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://{self.server_address[0]}:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self):  # noqa: N802
        self._answer(body=False)

    def _answer(self, body):
        url = urllib.parse.urlsplit(self.path)
        if url.scheme == "http" and url.hostname == MIRROR:
            return self._forward(url, body)
        if not url.scheme and self.path.startswith("/hub/") and self.server.hub_root:
            return self._hub(self.path.removeprefix("/hub/"), body)
        self.send_error(403, "only Debian's mirror and the local hub are served")

    def _forward(self, url, body):
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        conn.request(self.command, url.path + (f"?{url.query}" if url.query else ""), headers=headers)
        upstream = conn.getresponse()
        self.send_response(upstream.status, upstream.reason)
        for name, value in upstream.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "keep-alive"):
                self.send_header(name, value)
        self.end_headers()
        while body and (chunk := upstream.read(1 << 16)):
            self.wfile.write(chunk)
        conn.close()
        self.server.forwarded += 1

    def _hub(self, path, body):
        # Hugging Face's layout: REPO/resolve/REVISION/FILE; here REPO/REVISION are folders.
        repo_rev, _, name = path.partition("/resolve/")
        target = (Path(self.server.hub_root) / repo_rev / name).resolve()
        if not name or Path(self.server.hub_root).resolve() not in target.parents or not target.is_file():
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(target.stat().st_size))
        self.end_headers()
        if body:
            with open(target, "rb") as handle:
                shutil.copyfileobj(handle, self.wfile)

    def log_message(self, *args):
        pass


class Host:
    """One booted Debian 12 container: `ssh()`, `address`, `stop()`."""

    def __init__(self, workdir, hub_root=None):
        self.workdir = Path(workdir)
        self.tag = f"vtd{os.getpid() % 100000}"
        subnet = 16 + os.getpid() % 200
        self.gateway, self.address = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.root = self.workdir / "rootfs"
        self.key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.netns = self.tag
        self.proc = None
        self.proxy = None
        self.hub_root = hub_root

    def boot(self):
        """Copy the cached root filesystem, wire the network, boot systemd, wait for sshd."""
        subprocess.run(["cp", "-a", "--reflink=auto", str(base_rootfs()), str(self.root)], check=True)
        self._trust_host_cas()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(f"{self.key}.pub", ssh_dir / "authorized_keys")
        (self.root / "etc/hostname").write_text("vibethinker-test\n")
        self._network()
        self.proxy = MirrorProxy((self.gateway, 0), self.hub_root)
        with open(self.workdir / "boot.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-b", "-D", str(self.root), "--register=no", "--keep-unit", "--console=pipe",
                 "--capability=CAP_NET_ADMIN",  # its own firewall, in its own netns
                 f"--network-namespace-path=/run/netns/{self.netns}", f"--machine={self.tag}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {(self.workdir / 'boot.log').read_text()[-2000:]}")
            if self.ssh("systemctl is-system-running --wait", check=False, timeout=30).stdout.strip() in (
                    "running", "degraded"):
                return self
            time.sleep(0.5)
        raise RuntimeError("the test host did not come up within 60 s")

    def _trust_host_cas(self):
        # HTTPS from here passes through a proxy whose CAs live in this folder.
        for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(cert, self.root / "usr/local/share/ca-certificates" / cert.name)
        subprocess.run(["chroot", str(self.root), "update-ca-certificates"], check=True, capture_output=True)

    def _network(self):
        outside, inside = f"{self.tag}h", f"{self.tag}c"
        for cmd in (f"ip netns add {self.netns}",
                    f"ip link add {outside} type veth peer name {inside}",
                    f"ip link set {inside} netns {self.netns}",
                    f"ip addr add {self.gateway}/30 dev {outside}",
                    f"ip link set {outside} up",
                    f"ip -n {self.netns} addr add {self.address}/30 dev {inside}",
                    f"ip -n {self.netns} link set {inside} up",
                    f"ip -n {self.netns} link set lo up"):
            subprocess.run(cmd.split(), check=True)

    def ssh_args(self):
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
                "-o", "BatchMode=yes"]

    def ssh(self, command, check=True, timeout=120, input=None):
        """Run a shell command on the host as root: CompletedProcess with text output."""
        result = subprocess.run(["ssh", *self.ssh_args(), f"root@{self.address}", command], capture_output=True,
                                text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{command!r} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result

    def inventory(self, path):
        """An Ansible inventory naming this host."""
        path.write_text(
            "[vibethinker]\n"
            f"testhost ansible_host={self.address} ansible_user=root ansible_python_interpreter=/usr/bin/python3 "
            f"ansible_ssh_private_key_file={self.key} "
            f"ansible_ssh_common_args='-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=accept-new'\n")
        return path

    def processes(self):
        """Pids of processes whose root directory is this host's."""
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.readlink(entry / "root") == str(self.root):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self):
        """Power the host off (SIGKILL after 30 s), remove its network and files."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the host's systemd to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proxy:
            self.proxy.shutdown()
            self.proxy.server_close()
        subprocess.run(["ip", "link", "del", f"{self.tag}h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        left = self.processes()
        shutil.rmtree(self.root, ignore_errors=True)
        return left
