"""What the console holds beside the app (app.extensions), through one accessor: `parts()`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from auth.console import ConsoleAccess
    from service.console.oidc import Oidc
    from service.console.sessions import ConsoleSessions

KEY = "vibethinker.console"


@dataclass
class Parts:
    access: ConsoleAccess  # sign-in links and sessions in the database
    sessions: ConsoleSessions  # Flask's session interface over them
    oidc: Oidc | None  # sign-in through the organisation's provider, where one is configured


def parts():
    return current_app.extensions[KEY]
