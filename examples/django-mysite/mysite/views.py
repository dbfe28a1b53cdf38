"""The site's one page: says which revision of which service answered."""
import os

import django
from django.http import HttpRequest, HttpResponse
from django.templatetags.static import static
from django.utils.html import escape


def home(request: HttpRequest) -> HttpResponse:
    service = os.environ.get('K_SERVICE', 'mysite')
    revision = os.environ.get('K_REVISION', 'local')
    return HttpResponse(
        '<!doctype html><html><head><title>mysite</title>'
        f'<link rel="stylesheet" href="{static("admin/css/base.css")}"></head>'
        f'<body><div id="content"><h1>Hello from Django {django.get_version()}</h1>'
        f'<p>Served by revision {escape(revision)} of service {escape(service)}.</p>'
        '<p><a href="/admin/">Django administration</a></p></div></body></html>'
    )
