"""The controller's side of a deployment: ansible-playbook run so that no temporary file it makes is ever
removed, and a scan of the folders it writes for secret material.

Ansible removes its temporary files (ANSIBLE_LOCAL_TEMP) when a task or the run ends, so a run killed at
the wrong moment leaves them. Run through `KEEP`, nothing under ANSIBLE_LOCAL_TEMP is ever removed (the
forked workers inherit the patch): every file any task wrote there, at any moment, is still there at the
end, as if the run had been killed at each of those moments. A scan then finds a secret that touched the
disk (`leftovers`).
"""

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent

# python KEEP ansible-playbook ARGS...: ansible-playbook with removal under ANSIBLE_LOCAL_TEMP turned off.
KEEP = r"""
import os, runpy, shutil, sys
keep = os.path.realpath(os.environ["ANSIBLE_LOCAL_TEMP"]) + os.sep

def guard(remove):
    def kept(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and "dir_fd" not in kwargs \
                and os.path.realpath(os.fsdecode(path)).startswith(keep):
            return None
        return remove(path, *args, **kwargs)
    return kept

os.remove, os.unlink, os.rmdir, shutil.rmtree = map(guard, (os.remove, os.unlink, os.rmdir, shutil.rmtree))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def controller_env(work):
    """The environment a test's ansible-playbook runs in: its home, temporary folders and Ansible's own,
    all under `work`, where `leftovers` looks."""
    for name in ("ansible-tmp", "tmp"):
        (work / name).mkdir(exist_ok=True)
    return {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "ANSIBLE_NOCOLOR": "1", "HOME": str(work),
            "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"), "TMPDIR": str(work / "tmp"), "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1"}


def keeping(argv):
    """`argv` (ansible-playbook's) run with every temporary file kept (KEEP)."""
    return [sys.executable, "-c", KEEP, str(BIN / "ansible-playbook"), *map(str, argv[1:])]


def killed_at(argv, env, task, settle_s=1.0, timeout_s=1800):
    """Run ansible-playbook `argv` and kill it (SIGKILL, with every worker) `settle_s` after it starts
    `task` (its name as the run prints it: "role : name"); its output up to then."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines, deadline = [], time.monotonic() + timeout_s
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(f"TASK [{task}]"):
                time.sleep(settle_s)
                os.killpg(process.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(lines[-20:])
        else:
            raise AssertionError(f"the run never reached {task!r}:\n" + "".join(lines[-40:]))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        process.stdout.close()
    return "".join(lines)


def needles(secrets, public=()):
    """{bytes: what they are} for `secrets` {name: text}: each whole, in base64 (slurp's form, a vault's
    payload), and each line of 16 bytes or more (a PEM body line, as JSON or YAML would hold it) that is not
    also in one of the `public` texts (an EC key's last line is mostly its public point, which its
    certificate holds too, and may line up with the certificate's own base64)."""
    found = {}
    for name, secret in secrets.items():
        data = secret.strip().encode()
        found.setdefault(data, name)
        found.setdefault(base64.b64encode(data), f"{name} (base64)")
        found.setdefault(base64.b64encode(secret.encode()), f"{name} (base64)")
        for line in data.splitlines():
            if len(line.strip()) >= 16 and not line.startswith(b"-----") \
                    and not any(line.strip() in text.encode() for text in public):
                found.setdefault(line.strip(), f"{name} (a line)")
    return found


def leftovers(work, secrets, skip=(), public=()):
    """[(file, what)] for every file the controller's runs left under `work` (its files and Ansible's
    folders; never the folders in `skip`, such as a booted host's root) that holds any of `secrets`
    (`needles`, with `public` the texts that are no secret: certificates)."""
    look = needles(secrets, public)
    files = [path for path in work.iterdir() if path.is_file()]
    for folder in ("ansible-tmp", "tmp", ".ansible"):
        if (work / folder).is_dir():
            files += [path for path in (work / folder).rglob("*") if path.is_file() and not path.is_symlink()]
    hits = []
    for path in files:
        if any(path.is_relative_to(work / name) for name in skip):
            continue
        data = path.read_bytes()
        hits += [(str(path.relative_to(work)), what) for needle, what in look.items() if needle in data]
    return hits


def kept_files(work):
    """The files the runs left in ANSIBLE_LOCAL_TEMP (relative paths): the scan's proof that it had
    something to look at."""
    return sorted(str(path.relative_to(work / "ansible-tmp")) for path in (work / "ansible-tmp").rglob("*")
                  if path.is_file())
