"""What kind of app a source folder holds: an ordered table of rules (pure).

Each rule looks at the folder's file names and the text of a few small files and either
returns a ``BuildPlan`` or passes. The first rule that matches wins, so the order is the
precedence: an explicit ``Dockerfile``, then an explicit ``Procfile`` ``web:`` command, then
the frameworks, then the plain Python convention (``requirements.txt`` + ``main.py``, as
Google's Python buildpack). Nothing matching is an error that lists what was looked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from cloudlet.domain.errors import InvalidError

GUNICORN: Final = "exec gunicorn --bind :$PORT --workers 1 --threads 8 --timeout 0 {app}"
"""The seed's server settings; ``--timeout 0`` leaves request timeouts to the platform."""
UVICORN: Final = "exec uvicorn {app} --host 0.0.0.0 --port $PORT --workers 1"
"""ASGI apps: uvicorn has no request timeout of its own, so the platform's rules."""
REQUIREMENTS: Final = "requirements.txt"


@dataclass(frozen=True)
class SourceFacts:
    """What detection sees of a folder: every path, and the text of the files it reads."""

    files: frozenset[str]
    texts: Mapping[str, str] = field(default_factory=dict)

    def text(self, path: str) -> str:
        return self.texts.get(path, "")

    def top_level_modules(self) -> list[str]:
        """Top-level ``*.py`` files, ``main.py`` and ``app.py`` first."""
        names = sorted(f for f in self.files if "/" not in f and f.endswith(".py"))
        preferred = [n for n in ("main.py", "app.py") if n in names]
        return preferred + [n for n in names if n not in preferred]


@dataclass(frozen=True)
class BuildPlan:
    """How to build an image of the folder.

    ``command`` is None when the folder's own Dockerfile is used; otherwise it is the
    container's command (shell form), and ``packages`` are installed besides the
    requirements (the server, when the requirements do not name it).
    """

    kind: str
    description: str
    command: str | None = None
    requirements: bool = False
    packages: tuple[str, ...] = ()
    build_steps: tuple[str, ...] = ()

    @property
    def generated(self) -> bool:
        return self.command is not None


Rule = Callable[[SourceFacts], BuildPlan | None]


def reads(path: str) -> bool:
    """Whether a rule reads this file's text (the I/O side reads only these)."""
    top = "/" not in path
    return (
        (top and path in ("Procfile", REQUIREMENTS))
        or (top and path.endswith(".py"))
        or (path.count("/") == 1 and path.endswith("/settings.py"))
    )


def _requires(facts: SourceFacts, package: str) -> bool:
    pattern = rf"^\s*{re.escape(package)}\s*([\[=<>~!;#@ ]|$)"
    return re.search(pattern, facts.text(REQUIREMENTS), re.I | re.M) is not None


def _plan(
    facts: SourceFacts, kind: str, description: str, command: str, server: str = ""
) -> BuildPlan:
    has_requirements = REQUIREMENTS in facts.files
    extra = (server,) if server and not _requires(facts, server) else ()
    return BuildPlan(kind, description, command, has_requirements, extra)


def dockerfile_rule(facts: SourceFacts) -> BuildPlan | None:
    if "Dockerfile" not in facts.files:
        return None
    return BuildPlan("dockerfile", "the folder's Dockerfile")


def procfile_rule(facts: SourceFacts) -> BuildPlan | None:
    match = re.search(r"^web:[ \t]*(\S.*?)\s*$", facts.text("Procfile"), re.M)
    if match is None:
        return None
    command = match.group(1)
    return _plan(facts, "procfile", f"the Procfile's web command ({command})", f"exec {command}")


def django_rule(facts: SourceFacts) -> BuildPlan | None:
    if "manage.py" not in facts.files:
        return None
    packages = sorted(f.split("/")[0] for f in facts.files if re.fullmatch(r"[\w]+/wsgi\.py", f))
    if not packages:
        return None
    named = re.search(r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"](\w+)\.""", facts.text("manage.py"))
    package = named.group(1) if named and named.group(1) in packages else packages[0]
    plan = _plan(
        facts,
        "django",
        f"a Django project (manage.py and {package}/wsgi.py)",
        GUNICORN.format(app=f"{package}.wsgi:application"),
        "gunicorn",
    )
    if "STATIC_ROOT" in facts.text(f"{package}/settings.py"):
        return _with_steps(plan, "python manage.py collectstatic --noinput")
    return plan


def _with_steps(plan: BuildPlan, *steps: str) -> BuildPlan:
    return BuildPlan(
        plan.kind, plan.description, plan.command, plan.requirements, plan.packages, steps
    )


def _app_variable(facts: SourceFacts, constructor: str) -> tuple[str, str] | None:
    """(module, variable) of the first top-level module that does ``x = Constructor(``."""
    pattern = rf"^(\w+)\s*(?::[^=]+)?=\s*(?:\w+\.)?{constructor}\("
    for module in facts.top_level_modules():
        match = re.search(pattern, facts.text(module), re.M)
        if match:
            return module.removesuffix(".py"), match.group(1)
    return None


def flask_rule(facts: SourceFacts) -> BuildPlan | None:
    found = _app_variable(facts, "Flask")
    if found is None:
        return None
    app = f"{found[0]}:{found[1]}"
    return _plan(facts, "flask", f"a Flask app ({app})", GUNICORN.format(app=app), "gunicorn")


def asgi_rule(facts: SourceFacts) -> BuildPlan | None:
    found = _app_variable(facts, "FastAPI") or _app_variable(facts, "Starlette")
    if found is None:
        return None
    app = f"{found[0]}:{found[1]}"
    return _plan(facts, "asgi", f"an ASGI app ({app})", UVICORN.format(app=app), "uvicorn")


def python_rule(facts: SourceFacts) -> BuildPlan | None:
    if not {REQUIREMENTS, "main.py"} <= facts.files:
        return None
    if re.search(r"^app\s*(?::[^=]+)?=", facts.text("main.py"), re.M):
        command = GUNICORN.format(app="main:app")
        return _plan(facts, "python", "a Python app (main.py's app)", command, "gunicorn")
    return _plan(facts, "python", "a Python program (main.py)", "exec python main.py")


RULES: Final[tuple[tuple[str, Rule], ...]] = (
    ("a Dockerfile", dockerfile_rule),
    ("a Procfile with a `web:` line", procfile_rule),
    ("a Django project (manage.py and a PACKAGE/wsgi.py)", django_rule),
    ("a Flask app (`app = Flask(...)` in a top-level .py file)", flask_rule),
    ("a FastAPI or Starlette app (`app = FastAPI(...)` in a top-level .py file)", asgi_rule),
    ("requirements.txt with a main.py", python_rule),
)
"""The rules in precedence order, each with what it looks for (used in the error)."""


def detect(facts: SourceFacts, folder: str = ".") -> BuildPlan:
    """The first rule's plan; an error listing every rule's requirement if none matches."""
    for _, rule in RULES:
        plan = rule(facts)
        if plan is not None:
            return plan
    looked_for = "".join(f"\n  - {what}" for what, _ in RULES)
    raise InvalidError(
        f"--source: cannot tell how to build {folder}; looked for:{looked_for}\n"
        "Add a Dockerfile, or a Procfile with a line like `web: python main.py` "
        "(the command must listen on $PORT).",
        field="--source",
    )
