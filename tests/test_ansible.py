"""ansible/ passes ansible-lint's production profile and the syntax check, and copies no unit or site file."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

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
