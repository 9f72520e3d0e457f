"""The house's layers, read from the source with `ast`: imports run downward only.

- Nothing under service/batches/ imports service/api/ (a batch line runs serving, not the routes).
- Flask and its kin (flask, flask_*, werkzeug) are imported only by the HTTP layer: service/api/, the
  admins' console (service/console/), the app
  factory, the app state's accessor, the CLI, gunicorn's config, and the two extension bindings
  (auth/guard.py with flask-jwt-extended, service/admission/ratelimit.py with flask-limiter).
- service/records/ and service/errors.py import nothing above them (records may import errors and each other).
- No test or bench module imports a test module, nor edits sys.path: what they share is tests/support.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTTP_LAYER = ("service/api/", "service/console/", "service/app.py", "service/state.py", "service/cli.py", "service/gunicorn_conf.py",
              "auth/guard.py", "service/admission/ratelimit.py")
FLASK = ("flask", "flask_", "werkzeug")


def sources(*folders):
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imports(path):
    """The modules `path` imports, each as a dotted name (relative imports resolved), anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def relative(path):
    return path.relative_to(ROOT).as_posix()


def test_imports_are_read_from_real_files():
    """The walk itself: it sees the app factory's Flask import and a route's import of serving."""
    assert "flask" in imports(ROOT / "service/app.py")
    assert any(name.startswith("service.serving") for name in imports(ROOT / "service/api/chat.py"))


@pytest.mark.parametrize("path", sources("service/batches"), ids=relative)
def test_batches_never_import_the_routes(path):
    assert not [name for name in imports(path) if name == "service.api" or name.startswith("service.api.")]


@pytest.mark.parametrize("path", sources("service", "auth"), ids=relative)
def test_flask_is_imported_only_by_the_http_layer(path):
    if relative(path).startswith(HTTP_LAYER):
        return
    flask = [name for name in imports(path) if name.split(".")[0].startswith(FLASK)]
    assert not flask, f"{relative(path)} imports {flask[0]}: only the HTTP layer may"


@pytest.mark.parametrize("path", [*sources("service/records"), ROOT / "service/errors.py"], ids=relative)
def test_records_and_errors_import_nothing_above_them(path):
    allowed = ("service.records", "service.errors") if "records" in path.parts else ()
    upward = [name for name in imports(path) if name.split(".")[0] in ("service", "auth")
              and not name.startswith(allowed)]
    assert not upward, f"{relative(path)} imports {upward[0]}, which runs back up"


@pytest.mark.parametrize("path", sources("tests", "bench"), ids=relative)
def test_no_module_imports_a_test_module(path):
    tests = [name for name in imports(path)
             if any(part.startswith("test_") or part == "conftest" for part in name.split("."))]
    assert not tests, f"{relative(path)} imports {tests[0]}: shared machinery belongs in tests/support"


@pytest.mark.parametrize("path", sources("tests", "bench"), ids=relative)
def test_no_module_edits_the_import_path(path):
    tree = ast.parse(path.read_text(), str(path))
    edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not edits, f"{relative(path)} touches sys.path on line {edits[0]}"
