"""The auth layer's own exceptions; the app maps them to the one error shape."""


class AuthError(Exception):
    """A request refused for who it is: status 401 or 403, with a machine code."""

    def __init__(self, status, message, code):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class StoreError(Exception):
    """A store operation refused: unknown user, duplicate name, bad value (status 400/404/409)."""

    def __init__(self, status, message, code, param=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
