"""The systemd unit: verified by systemd-analyze, and its exposure bounded."""

import re
import shutil
import subprocess

import pytest

from tests.support.servers import ROOT

UNIT = ROOT / "systemd" / "vibethinker.service"
MAX_EXPOSURE = 2.0


def analyze(*args):
    binary = shutil.which("systemd-analyze")
    if not binary:
        pytest.fail("systemd-analyze is missing (Debian's systemd package)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_security_exposure_is_bounded():
    out = analyze("security", "--offline=true", "--no-pager", str(UNIT))
    level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout).group(1))
    assert level <= MAX_EXPOSURE, out.stdout


def fake_root(tmp_path, unit_text):
    """A root holding systemd's own units, the ExecStart binaries, and our unit."""
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    gunicorn = tmp_path / "opt/vibethinker/venv/bin/gunicorn"
    gunicorn.parent.mkdir(parents=True)
    gunicorn.write_text("#!/bin/sh\n")
    gunicorn.chmod(0o755)
    (tmp_path / "bin").mkdir()
    shutil.copy("/bin/kill", tmp_path / "bin/kill")
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    (tmp_path / "etc/systemd/system/vibethinker.service").write_text(unit_text)
    return tmp_path


def test_unit_verifies(tmp_path):
    root = fake_root(tmp_path, UNIT.read_text())
    out = analyze("verify", f"--root={root}", "vibethinker.service")
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_verify_would_catch_a_broken_unit(tmp_path):
    broken = UNIT.read_text().replace("ExecStart=/opt/vibethinker/venv/bin/gunicorn",
                                      "ExecStart=/opt/vibethinker/venv/bin/gunicorm")
    root = fake_root(tmp_path, broken)
    assert analyze("verify", f"--root={root}", "vibethinker.service").returncode != 0


def test_unit_keeps_what_the_service_needs():
    text = UNIT.read_text()
    for line in ["Type=notify", "KillMode=mixed", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=", "UMask=0077",
                 "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_UNIX", "StateDirectory=vibethinker",
                 "RuntimeDirectory=vibethinker", "LogsDirectory=vibethinker"]:
        assert line in text.splitlines(), line
    # PyTorch's oneDNN JIT needs writable+executable pages
    assert not any(line.startswith("MemoryDenyWriteExecute=yes") for line in text.splitlines())
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
    assert stop > 60 + 15  # above gunicorn's graceful_timeout at the default deadline


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_the_site_drop_in_opens_the_gpu_only_for_the_cuda_variant(tmp_path, variant):
    import jinja2

    template = (ROOT / "ansible/roles/app/templates/site.conf.j2").read_text()
    drop_in = jinja2.Template(template).render(ansible_managed="test", app_memory_max="",
                                               app_torch_variant=variant)
    root = fake_root(tmp_path, UNIT.read_text())
    (root / "etc/systemd/system/vibethinker.service.d").mkdir()
    (root / "etc/systemd/system/vibethinker.service.d/site.conf").write_text(drop_in)
    out = analyze("verify", f"--root={root}", "vibethinker.service")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    allowed = re.findall(r"^DeviceAllow=(\S+) rw$", drop_in, re.M)
    if variant == "cuda":
        assert allowed == ["char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"]
        assert "PrivateDevices=no" in drop_in
    else:
        assert not allowed and "PrivateDevices" not in drop_in


def test_the_backup_units_verify_and_are_confined(tmp_path):
    root = fake_root(tmp_path, UNIT.read_text())
    admin = root / "opt/vibethinker/venv/bin/vibethinker-admin"
    admin.write_text("#!/bin/sh\n")
    admin.chmod(0o755)
    for name in ("vibethinker-backup.service", "vibethinker-backup.timer"):
        (root / "etc/systemd/system" / name).write_text((ROOT / "systemd" / name).read_text())
    out = analyze("verify", f"--root={root}", "vibethinker-backup.timer", "vibethinker-backup.service")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    exposure = analyze("security", "--offline=true", "--no-pager", str(ROOT / "systemd/vibethinker-backup.service"))
    level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", exposure.stdout).group(1))
    assert level <= MAX_EXPOSURE, exposure.stdout
    service = (ROOT / "systemd/vibethinker-backup.service").read_text().splitlines()
    assert "Type=oneshot" in service and "User=vibethinker" in service
    assert any(line.startswith("ExecStart=") and "db backup --into /var/lib/vibethinker-backups --keep" in line
               for line in service)
    timer = (ROOT / "systemd/vibethinker-backup.timer").read_text().splitlines()
    assert "Persistent=true" in timer and any(line.startswith("OnCalendar=") for line in timer)


def test_the_document_readers_unit_is_bounded_tighter_and_cut_off():
    reader = ROOT / "systemd" / "vibethinker-reader@.service"
    out = analyze("security", "--offline=true", "--no-pager", str(reader))
    level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout).group(1))
    assert level <= MAX_EXPOSURE, out.stdout
    text = reader.read_text()
    for line in ["DynamicUser=yes", "PrivateNetwork=yes", "IPAddressDeny=any", "StandardInput=socket",
                 "InaccessiblePaths=-/var/lib/vibethinker -/etc/vibethinker"]:
        assert line in text.splitlines() or any(l.startswith(line) for l in text.splitlines()), line
    assert "Accept=yes" in (ROOT / "systemd" / "vibethinker-reader.socket").read_text()
