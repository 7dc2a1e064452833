"""
A tiny WSGI application for the web server's tests: it answers with what it
was asked, as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any


def application(
    environ: dict[str, Any], start_response: Callable[..., Any]
) -> Iterable[bytes]:
    """
    Answer every request with its method, path, query, body length and
    scheme, as JSON.

    Args:
        environ: The WSGI environment.
        start_response: The WSGI callback.

    Returns:
        The JSON body.
    """
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    answer = {
        "method": environ["REQUEST_METHOD"],
        "script_name": environ.get("SCRIPT_NAME", ""),
        "path": environ.get("PATH_INFO", ""),
        "query": environ.get("QUERY_STRING", ""),
        "body_length": len(body),
        "scheme": environ["wsgi.url_scheme"],
    }
    data = json.dumps(answer).encode("utf-8")
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]


#: Not an application: ``--wsgi tests.wsgi_app.not_callable`` is refused.
not_callable = 42
