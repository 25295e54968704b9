"""Shared test setup: attn.compile's package cache lives in a temporary
folder for the session, so that the tests neither read packages left by
earlier runs nor leave any in the user's ~/.cache/attn (specs compiled by
several tests are still compiled once per session)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _session_package_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTN_CACHE_DIR", str(tmp_path_factory.mktemp("attn-cache")))
    mp.delenv("ATTN_CACHE", raising=False)
    yield
    mp.undo()
