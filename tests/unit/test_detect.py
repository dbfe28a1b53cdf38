"""Detecting the app in a source folder, the Dockerfile generated for it, and image names."""

from __future__ import annotations

import pytest

from cloudlet.builder.detect import RULES, BuildPlan, SourceFacts, detect, reads
from cloudlet.builder.dockerfile import render
from cloudlet.builder.reference import source_image, validate_image
from cloudlet.domain.errors import InvalidError

GUNICORN = "exec gunicorn --bind :$PORT --workers 1 --threads 8 --timeout 0"
FLASK = "from flask import Flask\n\napp = Flask(__name__)\n"
FASTAPI = "import fastapi\n\napi = fastapi.FastAPI()\n"
MANAGE = 'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")\n'


def facts(**texts: str) -> SourceFacts:
    """A folder holding the named files (``__`` in a name is a ``/``) with these texts."""
    named = {name.replace("__", "/").replace("_DOT_", "."): text for name, text in texts.items()}
    return SourceFacts(frozenset(named), named)


@pytest.mark.parametrize(
    ("folder", "kind", "command"),
    [
        (facts(Dockerfile="FROM x", main_DOT_py=FLASK), "dockerfile", None),
        (
            facts(Procfile="release: x\nweb: python serve.py --port $PORT\n", manage_DOT_py=""),
            "procfile",
            "exec python serve.py --port $PORT",
        ),
        (facts(Procfile="worker: celery\n", main_DOT_py=FLASK), "flask", f"{GUNICORN} main:app"),
        (
            facts(manage_DOT_py=MANAGE, shop__wsgi_DOT_py="", admin__wsgi_DOT_py=""),
            "django",
            f"{GUNICORN} shop.wsgi:application",
        ),
        (
            facts(manage_DOT_py="", mysite__wsgi_DOT_py=""),
            "django",
            f"{GUNICORN} mysite.wsgi:application",
        ),
        (facts(manage_DOT_py=""), None, None),  # no wsgi.py: not a Django project
        (facts(app_DOT_py=FLASK), "flask", f"{GUNICORN} app:app"),
        (
            facts(server_DOT_py="application = Flask(__name__)\n"),
            "flask",
            f"{GUNICORN} server:application",
        ),
        (
            facts(main_DOT_py=FASTAPI),
            "asgi",
            "exec uvicorn main:api --host 0.0.0.0 --port $PORT --workers 1",
        ),
        (facts(main_DOT_py="app = Starlette(routes=[])\n"), "asgi", None),
        (
            facts(requirements_DOT_txt="", main_DOT_py="app = make_wsgi_app()\n"),
            "python",
            f"{GUNICORN} main:app",
        ),
        (
            facts(requirements_DOT_txt="", main_DOT_py="serve_forever()\n"),
            "python",
            "exec python main.py",
        ),
        (facts(main_DOT_py="print('no requirements')\n"), None, None),
        (facts(README_DOT_md="hello"), None, None),
    ],
)
def test_the_first_matching_rule_decides_how_a_folder_is_built(
    folder: SourceFacts, kind: str | None, command: str | None
) -> None:
    if kind is None:
        with pytest.raises(InvalidError):
            detect(folder)
        return
    plan = detect(folder)
    assert plan.kind == kind
    if command is not None or kind == "dockerfile":
        assert plan.command == command


def test_no_match_lists_every_rule_and_suggests_a_dockerfile_or_procfile() -> None:
    with pytest.raises(InvalidError) as caught:
        detect(facts(notes_DOT_txt="hi"), "./notes")
    message = caught.value.message
    assert caught.value.field == "--source"
    assert "cannot tell how to build ./notes" in message
    for what, _ in RULES:
        assert what in message
    assert "Add a Dockerfile, or a Procfile" in message


@pytest.mark.parametrize(
    ("requirements", "extra"),
    [
        ("Flask>=3\n", ("gunicorn",)),
        ("Flask>=3\ngunicorn==23.0.0\n", ()),
        ("flask\nGunicorn[gevent]\n", ()),
        ("flask\ngunicorn-extras\n", ("gunicorn",)),
        ("# gunicorn\nflask\n", ("gunicorn",)),
    ],
)
def test_the_server_is_installed_only_when_the_requirements_lack_it(
    requirements: str, extra: tuple[str, ...]
) -> None:
    plan = detect(facts(main_DOT_py=FLASK, requirements_DOT_txt=requirements))
    assert plan.requirements
    assert plan.packages == extra


def test_a_django_project_with_static_root_collects_static_files_at_build_time() -> None:
    folder = facts(
        manage_DOT_py="", mysite__wsgi_DOT_py="", mysite__settings_DOT_py="STATIC_ROOT=1"
    )
    assert detect(folder).build_steps == ("python manage.py collectstatic --noinput",)
    assert detect(facts(manage_DOT_py="", mysite__wsgi_DOT_py="")).build_steps == ()


@pytest.mark.parametrize(
    ("path", "read"),
    [
        ("requirements.txt", True),
        ("Procfile", True),
        ("main.py", True),
        ("mysite/settings.py", True),
        ("pkg/sub/settings.py", False),
        ("pkg/main.py", False),
        ("static/big.js", False),
    ],
)
def test_detection_reads_only_a_few_small_files(path: str, read: bool) -> None:
    assert reads(path) is read


def test_the_generated_dockerfile_installs_dependencies_before_copying_the_source() -> None:
    plan = detect(facts(main_DOT_py=FLASK, requirements_DOT_txt="flask\n"))
    lines = render(plan).splitlines()
    steps = [line for line in lines if not line.startswith("#")]
    assert steps == [
        "FROM python:3.11-slim",
        "ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore",
        "WORKDIR /app",
        "COPY requirements.txt ./",
        "RUN pip install --no-cache-dir -r requirements.txt gunicorn",
        "COPY . ./",
        f"CMD {GUNICORN} main:app",
    ]
    assert "a Flask app (main:app)" in lines[0]


def test_a_django_dockerfile_collects_static_files_after_copying_the_source() -> None:
    folder = facts(
        manage_DOT_py="",
        requirements_DOT_txt="django\ngunicorn\n",
        mysite__wsgi_DOT_py="",
        mysite__settings_DOT_py="STATIC_ROOT = BASE_DIR / 'static'",
    )
    lines = render(detect(folder)).splitlines()
    assert lines.index("COPY . ./") < lines.index("RUN python manage.py collectstatic --noinput")
    assert "RUN pip install --no-cache-dir -r requirements.txt" in lines


def test_without_requirements_only_the_server_is_installed() -> None:
    lines = render(detect(facts(main_DOT_py=FLASK))).splitlines()
    assert "RUN pip install --no-cache-dir gunicorn" in lines
    assert not any("requirements.txt" in line for line in lines)


def test_a_procfile_app_without_requirements_installs_nothing() -> None:
    lines = render(detect(facts(Procfile="web: python -m http.server $PORT\n"))).splitlines()
    assert not any(line.startswith("RUN") for line in lines)
    assert lines[-1] == "CMD exec python -m http.server $PORT"


def test_a_folder_with_its_own_dockerfile_gets_no_generated_one() -> None:
    with pytest.raises(ValueError, match="own Dockerfile"):
        render(BuildPlan("dockerfile", "the folder's Dockerfile"))


@pytest.mark.parametrize(
    "image",
    [
        "eu.gcr.io/my-project/my-dj-app",
        "my-app",
        "my-app:v1.2",
        "localhost:5000/team/app:latest",
        "cloudlet.local/default/svc:20250101-120000-ab12",
        "a__b/c-d.e",
    ],
)
def test_valid_image_names_are_accepted(image: str) -> None:
    assert validate_image(image) == image


@pytest.mark.parametrize(
    "image", ["My-App", "app:", "-app", "app:-bad", "eu.gcr.io//app", "app name", ""]
)
def test_invalid_image_names_are_refused_naming_the_flag(image: str) -> None:
    with pytest.raises(InvalidError, match=r"--tag: .* is not a valid image name") as caught:
        validate_image(image)
    assert caught.value.field == "--tag"


def test_source_images_are_named_after_the_project_and_service_with_a_tag_per_build() -> None:
    assert source_image("proj", "shop", "v7") == "cloudlet.local/proj/shop:v7"
