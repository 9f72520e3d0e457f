"""The admins' console: pages at /admin/console/ for admins in a browser (service.console.views)."""

from auth.console import ConsoleAccess
from auth.tokens import parse_duration
from service.console import views
from service.console.parts import KEY, Parts
from service.console.sessions import ConsoleSessions


def init_app(app, state):
    """Sessions (server-side, the console's paths only), the pages, and the provider's sign-in if configured."""
    settings = state.settings
    access = ConsoleAccess(state.store)
    sessions = ConsoleSessions(access, parse_duration(settings.console_idle_timeout),
                               parse_duration(settings.console_session_lifetime),
                               parse_duration(settings.console_link_ttl),
                               secure=settings.console_base.startswith("https://"))
    app.session_interface = sessions
    oidc = None
    if settings.console_oidc_issuer:
        from service.console.oidc import Oidc  # authlib: loaded only where a provider is configured

        oidc = Oidc(app, settings, settings.console_base)
    app.extensions[KEY] = Parts(access, sessions, oidc)
    app.register_blueprint(views.bp)
    app.after_request(views.console_headers)
