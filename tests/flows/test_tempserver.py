"""The temporary Prefect server ``mascprocess`` starts first thing (flows._tempserver), in fresh processes.

Prefect reads its settings once, at import, so each case runs in a child
process with the environment it is about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, os, urllib.request
import psutil
from flows._tempserver import early_server

me = psutil.Process()
out = {}
with early_server() as server:
    out["server"] = server is not None
    if server is not None:
        server.wait(180)
        with urllib.request.urlopen(server.api_url + "/health", timeout=5) as r:
            out["health"] = r.status
        out["pid"] = server.proc.pid
        from prefect.settings import PREFECT_API_URL, temporary_settings
        from prefect.client.orchestration import get_client
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            with get_client(sync_client=True) as client:
                out["api_answers"] = client.api_healthcheck() is None
out["children_after"] = [p.pid for p in me.children(recursive=True)]
print(json.dumps(out))
"""


def _probe(env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, cwd=str(ROOT),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


@pytest.mark.prefect
def test_without_an_api_url_a_server_starts_answers_and_is_gone_after(tmp_path):
    out = _probe(_env(tmp_path / "home"))
    assert out["server"] and out["health"] == 200 and out["api_answers"]
    assert out["children_after"] == []  # stopped and reaped
    assert not Path(f"/proc/{out['pid']}").exists()
    assert (tmp_path / "home" / "prefect.db").exists()  # its database is the one Prefect's own would use


def test_an_api_url_in_the_environment_starts_no_server(tmp_path):
    env = _env(tmp_path / "home")
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    assert _probe(env) == {"server": False, "children_after": []}


def test_an_api_url_in_the_active_profile_stops_the_server_started_first(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "station"\n\n[profiles.station]\n'
                                        'PREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    out = _probe(_env(home))
    assert out == {"server": False, "children_after": []}  # started on the environment's word, then stopped
