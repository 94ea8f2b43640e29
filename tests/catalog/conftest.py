"""Fixtures of the catalog tests: every test runs on SQLite and on PostgreSQL (``db_url``, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mascara.catalog import Catalog, connect


@pytest.fixture
def catalog(db_url: str) -> Iterator[Catalog]:
    cat = connect(db_url)
    try:
        yield cat
    finally:
        cat.close()
