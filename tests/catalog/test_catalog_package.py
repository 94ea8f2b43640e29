"""The catalog package loads its tables on first use: checking a catalog URL costs SQLAlchemy alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import sys
from mascara.selection import check_catalog_url
check_catalog_url(None, sys.argv[1])
print(" ".join(m for m in ("sqlmodel", "mascara.catalog.catalog", "mascara.catalog.models") if m in sys.modules))
"""


def test_checking_a_catalog_url_loads_no_table(tmp_path):
    """``mascprocess`` checks its catalog URL before it starts Prefect's temporary server: with the whole
    package loaded (SQLModel and the tables, 0.15-0.3 s) the server started that much later."""
    got = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    assert got.stdout.split() == [], got.stdout


def test_the_package_names_load_on_first_use():
    import mascara.catalog as cat
    from mascara.catalog import Catalog, LeaseHeld, STATUSES, lifecycle
    from mascara.catalog.catalog import Catalog as direct

    assert Catalog is direct and issubclass(LeaseHeld, Exception)
    assert "succeeded" in STATUSES and lifecycle.__name__ == "mascara.catalog.lifecycle"
    import mascara.catalog.catalog as catalog_module
    import mascara.catalog.models as models_module

    for name in cat.__all__:  # every exported name resolves, to the object of the module that defines it
        home = models_module if name in vars(models_module) else catalog_module
        assert getattr(cat, name) is getattr(home, name), name
        assert name in dir(cat), name
    with pytest.raises(AttributeError, match="no_such_name"):
        cat.no_such_name  # noqa: B018
