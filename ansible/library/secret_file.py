#!/usr/bin/python3
"""Ansible module: write a secret file on the managed host from a value, with no copy on the controller's disk.

`copy` with `content:` and `template` both write their text to a temporary file on the controller first
(removed afterwards, left behind by an interrupted run). A module's arguments are not: with pipelining
(group_vars/all.yml) they reach the host inside the module's payload on ssh's standard input. So a secret
(a key, a password-bearing settings file rendered with `lookup('template', ...)`) is written with this.
"""

import grp
import os
import pwd
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: secret_file
short_description: Write a file from a value (a secret) without a temporary file on the controller
options:
  dest: {description: The file to write (its folder must exist)., type: path, required: true}
  content: {description: What the file holds; never logged or returned., type: str, required: true}
  owner: {description: Its owner (a user name)., type: str, default: root}
  group: {description: Its group (a group name)., type: str, default: root}
  mode: {description: Its mode, an octal string ("0640"; an unquoted 0640 is read as YAML's number), type: raw,
         default: "0600"}
"""


def octal(mode):
    """A mode as given: "0640" or "640", or the number YAML makes of an unquoted 0640 (as `file` takes it)."""
    if isinstance(mode, int):
        return mode
    if not isinstance(mode, str) or not mode.isdigit() or set(mode) - set("01234567") or len(mode.lstrip("0")) > 4:
        raise ValueError(f"mode must be an octal string such as '0640', not {mode!r}")
    return int(mode, 8)


def attributes(path):
    """(uid, gid, mode) of `path`, or None when it does not exist."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_uid, stat.st_gid, stat.st_mode & 0o7777


def main():
    module = AnsibleModule(
        argument_spec={"dest": {"type": "path", "required": True},
                       "content": {"type": "str", "required": True, "no_log": True},
                       "owner": {"type": "str", "default": "root"},
                       "group": {"type": "str", "default": "root"},
                       "mode": {"type": "raw", "default": "0600"}},
        supports_check_mode=True)
    dest, data = module.params["dest"], module.params["content"].encode()
    folder, name = os.path.split(dest)
    # What a run killed between writing and renaming left behind (a copy of the secret): never kept.
    if not module.check_mode and os.path.isdir(folder):
        for left in os.listdir(folder):
            if left.startswith(f".{name}.") and left.endswith(".part"):
                os.unlink(os.path.join(folder, left))
    try:
        mode = octal(module.params["mode"])
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    try:
        wanted = (pwd.getpwnam(module.params["owner"]).pw_uid, grp.getgrnam(module.params["group"]).gr_gid, mode)
    except KeyError as exc:
        if module.check_mode:  # a dry run before the user or group exists: it would be made
            module.exit_json(changed=True, dest=dest)
        module.fail_json(msg=f"no such owner or group: {exc}")
    try:
        with open(dest, "rb") as current:
            same = current.read() == data
    except FileNotFoundError:
        same = False
    changed = not same or attributes(dest) != wanted
    if changed and not module.check_mode:
        if same:
            # Owner only: no one but it may read while the group changes; then the mode wanted.
            os.chmod(dest, wanted[2] & 0o700)
            os.chown(dest, *wanted[:2])
            os.chmod(dest, wanted[2])
        else:
            # Owner and mode are set before a byte is written; the rename makes it whole at once.
            fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            try:
                os.fchown(fd, *wanted[:2])
                os.fchmod(fd, wanted[2])
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, dest)
            except OSError as exc:
                if os.path.exists(temp):
                    os.unlink(temp)
                module.fail_json(msg=f"cannot write {dest}: {exc.strerror}")
    module.exit_json(changed=changed, dest=dest)


if __name__ == "__main__":
    main()
