"""Server fixtures: mra-serve's app on the shared tiny bundle (tests/conftest.py; see
serve_helpers), an in-process Pipeline with the same settings as the reference its greedy
answers must equal, and an official `openai` client."""

from __future__ import annotations

import pytest
from serve_helpers import API_KEY, ServerThread, local_app, wait_ready


@pytest.fixture(scope="session")
def server(tiny_bundle):
    """The shared server: --parallel 2, an API key; (url, backend)."""
    app, backend = local_app(tiny_bundle)
    with ServerThread(app) as s:
        wait_ready(s.url)
        yield s.url, backend


@pytest.fixture(scope="session")
def reference(pipe):
    """The Pipeline whose greedy answers the server's must equal: the slots' settings."""
    return pipe


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=120)
