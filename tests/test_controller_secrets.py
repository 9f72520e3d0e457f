"""No secret on the controller's disk: `secret_file` (ansible/library) against `copy content:`, on this
machine (`-c local`), with every temporary file Ansible makes kept (tests/support/controller.py).

The deployment tests run the same scan after real runs against booted hosts (tests/test_deploy.py,
tests/test_deploy_cluster.py); these show the scan finds what `copy` leaves, and what pipelining is for.
"""

import grp
import os
import pwd
import secrets
import stat
import subprocess

import pytest
import yaml

from tests.support.controller import controller_env, keeping, kept_files, leftovers
from tests.support.servers import ROOT

pytestmark = pytest.mark.slow


def play(tmp_path, tasks, pipelining=True, verbosity="-v", ok=True):
    """Run `tasks` twice on this machine through KEEP (-v: each result shown) with a fresh secret: (the
    secret, each run's output, the work folder, the output folder)."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "template.j2").write_text("password = {{ secret }}\n")
    (work / "play.yml").write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {"ansible_pipelining": pipelining, "ansible_python_interpreter": "/usr/bin/python3",
                 "secret": "{{ lookup('ansible.builtin.env', 'THE_SECRET') }}", "out": str(out),
                 "owner": pwd.getpwuid(os.getuid()).pw_name, "group": grp.getgrgid(os.getgid()).gr_name},
        "tasks": tasks}]))
    secret = secrets.token_urlsafe(24)
    env = {**controller_env(work), "THE_SECRET": secret, "ANSIBLE_LIBRARY": str(ROOT / "ansible/library"),
           "ANSIBLE_ACTION_PLUGINS": str(ROOT / "ansible/action_plugins"),
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0", "ANSIBLE_LOCALHOST_WARNING": "0"}
    outputs = []
    for _ in range(2):
        run = subprocess.run(keeping(["ansible-playbook", verbosity, "-i", "localhost,", work / "play.yml"]),
                             env=env, capture_output=True, text=True, timeout=300, cwd=work)
        assert (run.returncode == 0) is ok, run.stdout[-3000:] + run.stderr[-3000:]
        outputs.append(run.stdout + run.stderr)
    return secret, outputs, work, out


WRITE = {"name": "write", "secret_file": {"content": "{{ secret }}", "dest": "{{ out }}/written",
                                          "owner": "{{ owner }}", "group": "{{ group }}", "mode": "0640"},
         "no_log": True}
RENDER = {"name": "render", "secret_file": {"content": "{{ lookup('ansible.builtin.template', 'template.j2') }}",
                                            "dest": "{{ out }}/rendered", "owner": "{{ owner }}",
                                            "group": "{{ group }}"}, "no_log": True}


def test_copy_content_leaves_the_secret_in_the_controllers_temporary_folder(tmp_path):
    secret, _, work, _ = play(tmp_path, [{"copy": {"content": "{{ secret }}", "dest": "{{ out }}/copied"},
                                          "no_log": True}])
    assert any(what == "secret" for _, what in leftovers(work, {"secret": secret})), kept_files(work)


def test_secret_file_writes_from_memory_and_leaves_nothing_behind(tmp_path):
    secret, outputs, work, out = play(tmp_path, [WRITE, RENDER])
    recaps = [output.split("PLAY RECAP")[-1] for output in outputs]
    assert "changed=2" in recaps[0] and "changed=0" in recaps[1], recaps
    assert (out / "written").read_text() == secret
    assert (out / "rendered").read_text() == f"password = {secret}\n"
    assert stat.S_IMODE((out / "written").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "rendered").stat().st_mode) == 0o600
    assert kept_files(work), "the scan had nothing to look at: were the temporary files kept?"
    assert leftovers(work, {"secret": secret}) == []


def test_secret_file_refuses_to_run_without_pipelining_which_the_site_turns_on(tmp_path):
    # Without pipelining a module's payload, its arguments inside, goes through a file on the controller:
    # the action plugin fails the task before anything is sent.
    secret, outputs, work, out = play(tmp_path, [WRITE], pipelining=False, ok=False)
    assert "secret_file needs pipelining" in outputs[0], outputs[0][-2000:]
    assert not (out / "written").exists()
    assert leftovers(work, {"secret": secret}) == []
    assert yaml.safe_load((ROOT / "ansible/group_vars/all.yml").read_text())["ansible_pipelining"] is True


def test_secret_file_fixes_owner_and_mode_and_shows_nothing(tmp_path):
    # The module's own no_log on content; and a mode given as YAML's number (an unquoted 0640 is 416).
    shown = {**WRITE, "name": "shown", "no_log": False, "secret_file": {**WRITE["secret_file"], "mode": 0o640}}
    secret, outputs, _, out = play(tmp_path, [WRITE, {"file": {"path": "{{ out }}/written", "mode": "0666"}}, shown],
                                   verbosity="-vvv")  # -vvv: the module's invocation (its arguments) shown
    assert stat.S_IMODE((out / "written").stat().st_mode) == 0o640
    assert "TASK [shown]" in outputs[1] and "changed: [localhost]" in outputs[1].split("TASK [shown]")[1]
    assert '"content": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"' in outputs[1], outputs[1][-3000:]
    assert all(secret not in output for output in outputs)
