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
  mode: {description: Its mode as an octal string., type: str, default: "0600"}
"""


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
                       "mode": {"type": "str", "default": "0600"}},
        supports_check_mode=True)
    dest, data = module.params["dest"], module.params["content"].encode()
    try:
        wanted = (pwd.getpwnam(module.params["owner"]).pw_uid, grp.getgrnam(module.params["group"]).gr_gid,
                  int(module.params["mode"], 8))
    except (KeyError, ValueError) as exc:
        module.fail_json(msg=f"owner, group or mode not usable: {exc}")
    try:
        with open(dest, "rb") as current:
            same = current.read() == data
    except FileNotFoundError:
        same = False
    changed = not same or attributes(dest) != wanted
    if changed and not module.check_mode:
        if same:
            os.chown(dest, *wanted[:2])
            os.chmod(dest, wanted[2])
        else:
            # Owner and mode are set before a byte is written; the rename makes it whole at once.
            fd, temp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.")
            try:
                os.fchown(fd, *wanted[:2])
                os.fchmod(fd, wanted[2])
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                os.unlink(temp)
                module.fail_json(msg=f"cannot write {dest}: {exc.strerror}")
            os.replace(temp, dest)
    module.exit_json(changed=changed, dest=dest)


if __name__ == "__main__":
    main()
