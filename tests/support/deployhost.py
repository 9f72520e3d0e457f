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

from tests.support.servers import free_port

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
    tools = dict(HOST_TOOLS)
    if os.environ.get("VIBE_DEPLOY_HOST") == "vm":
        tools.update({"qemu-system-x86_64": "qemu-system-x86", "mkfs.ext4": "e2fsprogs"})
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
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


def trust_host_cas(root):
    """Make `root` trust this machine's extra CAs: HTTPS from here passes through a proxy they sign for."""
    for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(cert, root / "usr/local/share/ca-certificates" / cert.name)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True)


def authorize_new_key(root, key):
    """A new ssh key pair at `key`, whose public half may log in to `root` as root."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.copy(f"{key}.pub", root / "root/.ssh/authorized_keys")


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


class Bridge:
    """A private network for several test hosts: a bridge here holding `gateway`, hosts at `address(n)`."""

    def __init__(self):
        self.name = f"vtb{os.getpid() % 100000}"
        self.subnet = f"10.214.{16 + os.getpid() % 200}"
        self.gateway = f"{self.subnet}.1"
        for cmd in (f"ip link add {self.name} type bridge", f"ip addr add {self.gateway}/24 dev {self.name}",
                    f"ip link set {self.name} up"):
            subprocess.run(cmd.split(), check=True)

    def address(self, number):
        return f"{self.subnet}.{number}"

    def remove(self):
        subprocess.run(["ip", "link", "del", self.name], capture_output=True)


class Host:
    """One booted Debian 12 container: `ssh()`, `address`, `stop()`.

    Alone, it has a /30 link to this machine; with `bridge` (and `number`), it is one host of a private
    network that several hosts share."""

    def __init__(self, workdir, hub_root=None, bridge=None, number=2, name="vibethinker-test"):
        self.workdir = Path(workdir)
        self.tag = f"vtd{os.getpid() % 100000}" + (f"n{number}" if bridge else "")
        self.bridge, self.name = bridge, name
        if bridge:
            self.gateway, self.address = bridge.gateway, bridge.address(number)
        else:
            subnet = 16 + os.getpid() % 200
            self.gateway, self.address = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.root = self.workdir / "rootfs"
        self.key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.netns = self.tag
        self.ssh_port, self.https_port, self.probe_port = 22, 443, 8081
        self.playbook_timeout_s = 900
        self.proc = None
        self.proxy = None
        self.hub_root = hub_root

    def boot(self):
        """Copy the cached root filesystem, wire the network, boot systemd, wait for sshd."""
        subprocess.run(["cp", "-a", "--reflink=auto", str(base_rootfs()), str(self.root)], check=True)
        trust_host_cas(self.root)
        authorize_new_key(self.root, self.key)
        (self.root / "etc/hostname").write_text(f"{self.name}\n")
        self._network()
        self.proxy = MirrorProxy((self.gateway, 0), self.hub_root)
        self.proxy_url = self.proxy.url
        with open(self.workdir / "boot.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-b", "-D", str(self.root), "--register=no", "--keep-unit", "--console=pipe",
                 "--capability=CAP_NET_ADMIN",  # its own firewall, in its own netns
                 f"--network-namespace-path=/run/netns/{self.netns}", f"--machine={self.tag}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self._wait_booted(self.workdir / "boot.log", timeout=60, pause=0.5)

    def _wait_booted(self, log, timeout, pause):
        """Wait until systemd inside says it is up, over ssh; fail with the console's end if the host dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                state = self.ssh("systemctl is-system-running --wait", check=False, timeout=120).stdout.strip()
            except subprocess.TimeoutExpired:
                continue
            if state in ("running", "degraded"):
                return self
            time.sleep(pause)
        raise RuntimeError(f"the test host did not come up within {timeout} s")

    def _network(self):
        outside, inside = f"{self.tag}h", f"{self.tag}c"
        ours = f"ip link set {outside} master {self.bridge.name}" if self.bridge else \
            f"ip addr add {self.gateway}/30 dev {outside}"
        for cmd in (f"ip netns add {self.netns}",
                    f"ip link add {outside} type veth peer name {inside}",
                    f"ip link set {inside} netns {self.netns}",
                    ours,
                    f"ip link set {outside} up",
                    f"ip -n {self.netns} addr add {self.address}/{24 if self.bridge else 30} dev {inside}",
                    f"ip -n {self.netns} link set {inside} up",
                    f"ip -n {self.netns} link set lo up"):
            subprocess.run(cmd.split(), check=True)

    def ssh_args(self):
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
                "-o", "BatchMode=yes"]

    def ssh(self, command, check=True, timeout=120, input=None):
        """Run a shell command on the host as root: CompletedProcess with text output."""
        result = subprocess.run(["ssh", *self.ssh_args(), "-p", str(self.ssh_port), f"root@{self.address}", command],
                                capture_output=True,
                                text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{command!r} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result

    def inventory(self, path):
        """An Ansible inventory naming this host."""
        path.write_text("[vibethinker]\n" + self.inventory_line("testhost"))
        return path

    def inventory_line(self, name):
        """This host's line in an Ansible inventory, as `name`."""
        return (f"{name} ansible_host={self.address} ansible_port={self.ssh_port} ansible_user=root "
                "ansible_python_interpreter=/usr/bin/python3 "
                f"ansible_ssh_private_key_file={self.key} "
                f"ansible_ssh_common_args='-o UserKnownHostsFile={self.known_hosts} "
                "-o StrictHostKeyChecking=accept-new'\n")

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

    def _power_off(self, ask, grace):
        """Ask the host to power off, kill it after `grace` seconds, stop the proxy."""
        if self.proc and self.proc.poll() is None:
            ask()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proxy:
            self.proxy.shutdown()
            self.proxy.server_close()

    def stop(self):
        """Power the host off (SIGKILL after 30 s), remove its network and files."""
        self._power_off(lambda: self.proc.send_signal(signal.SIGTERM), 30)  # nspawn asks systemd to power off
        subprocess.run(["ip", "link", "del", f"{self.tag}h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        left = self.processes()
        shutil.rmtree(self.root, ignore_errors=True)
        return left


def vm_image():
    """A bootable disk image of the same Debian 12 (kernel, DHCP, a baked test key), built once and cached."""
    base = base_rootfs()
    out = CACHE / f"vm-{base.name}"
    if (out / "disk.img").exists():
        return out
    partial = CACHE / f".partial-vm-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    root = partial / "root"
    partial.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    for mount in ("proc", "sys", "dev"):
        subprocess.run(["mount", "--bind", f"/{mount}", str(root / mount)], check=True)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in ("apt-get update -qq", "apt-get install -y -qq --no-install-recommends linux-image-amd64"):
            subprocess.run(["chroot", str(root), *cmd.split()], check=True, env=env, stdout=subprocess.DEVNULL)
    finally:
        for mount in ("dev", "sys", "proc"):
            subprocess.run(["umount", str(root / mount)], check=True)
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (root / "etc/hostname").write_text("vibethinker-vm\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")  # qemu's user-mode DNS
    (root / "etc/systemd/network/10-dhcp.network").write_text("[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n")
    subprocess.run(["systemctl", f"--root={root}", "enable", "systemd-networkd"], check=True, capture_output=True)
    authorize_new_key(root, partial / "id_ed25519")
    trust_host_cas(root)
    shutil.copy(next(root.glob("boot/vmlinuz-*")), partial / "vmlinuz")
    shutil.copy(next(root.glob("boot/initrd.img-*")), partial / "initrd.img")
    subprocess.run(["mkfs.ext4", "-q", "-L", "root", "-d", str(root), str(partial / "disk.img"), "8G"], check=True)
    shutil.rmtree(root)
    partial.rename(out)
    return out


class VmHost(Host):
    """The same Debian 12 under qemu (software emulation here: slow), reached through user-mode port forwards."""

    def __init__(self, workdir, hub_root=None):
        super().__init__(workdir, hub_root)
        self.address, self.gateway = "127.0.0.1", "10.0.2.2"  # qemu's user network: the host is 10.0.2.2
        self.ssh_port, self.https_port, self.probe_port = (free_port() for _ in range(3))
        self.playbook_timeout_s = 3 * 3600  # software emulation: 10-20 s per task
        self.root = None

    def boot(self):
        image = vm_image()
        disk = self.workdir / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(image / "disk.img"), str(disk)], check=True)
        shutil.copy(image / "id_ed25519", self.key)
        os.chmod(self.key, 0o600)
        self.proxy = MirrorProxy(("127.0.0.1", 0), self.hub_root)
        self.proxy_url = f"http://10.0.2.2:{self.proxy.server_address[1]}"
        forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{outside}-:{inside}" for outside, inside in (
            (self.ssh_port, 22), (self.https_port, 443), (self.probe_port, 8081)))
        with open(self.workdir / "console.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max",  # max: torch needs AVX2/FMA (qemu64: SIGILL)
                 "-m", "6144", "-smp", "2", "-nographic", "-no-reboot",
                 "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
                 "-append", "root=/dev/vda rw console=ttyS0",
                 "-drive", f"file={disk},format=raw,if=virtio", "-netdev", f"user,id=net0,{forwards}",
                 "-device", "virtio-net-pci,netdev=net0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self._wait_booted(self.workdir / "console.log", timeout=600, pause=2)

    def processes(self):
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def stop(self):
        """Power the VM off (kill qemu after 60 s) and remove its disk."""
        self._power_off(lambda: self.ssh("systemctl poweroff", check=False, timeout=30), 60)
        (self.workdir / "disk.img").unlink(missing_ok=True)
        return self.processes()


def make_host(workdir, hub_root=None):
    """The deployment target: a systemd-nspawn container, or a qemu VM when VIBE_DEPLOY_HOST=vm."""
    kind = os.environ.get("VIBE_DEPLOY_HOST", "nspawn")
    if kind not in ("nspawn", "vm"):
        raise ValueError(f"VIBE_DEPLOY_HOST must be nspawn or vm, not {kind!r}")
    return (VmHost if kind == "vm" else Host)(workdir, hub_root)
