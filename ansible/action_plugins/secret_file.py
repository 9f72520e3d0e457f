"""The controller's half of `secret_file` (ansible/library/secret_file.py): refuse to run without pipelining.

The module keeps a secret off the controller's disk only because its arguments travel inside its payload on
ssh's standard input, which Ansible does only with pipelining. Pipelining is switched off, silently, by
`ansible_pipelining: false` anywhere in the inventory or on the command line, by ANSIBLE_KEEP_REMOTE_FILES,
by an async task or a become method that cannot pipeline (su): the payload, secret included, would then be
written to a temporary file on the controller first. So the task fails instead, before anything is sent.
"""

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        if not self._connection.is_pipelining_enabled(wrap_async=bool(self._task.async_val)):
            raise AnsibleActionFail(
                "secret_file needs pipelining (ansible_pipelining: true, group_vars/all.yml), which is off for "
                "this task (ansible_pipelining false, ANSIBLE_KEEP_REMOTE_FILES, async, or a become method "
                "without it such as su): without it the secret would be written to the controller's disk")
        result.update(self._execute_module(module_name="secret_file", module_args=self._task.args,
                                           task_vars=task_vars))
        return result
