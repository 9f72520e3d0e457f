"""Users and their tokens, made by a server's own admin CLI."""


def user_token(server, name, *options):
    """A new user `name` of `server` (vibethinker-admin users add `options`) and a token of its: the token."""
    server.cli("users", "add", name, *options)
    return server.cli("tokens", "issue", name).stdout.strip().splitlines()[-1]
