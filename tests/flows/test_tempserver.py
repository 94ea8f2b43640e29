"""The temporary Prefect server ``mascprocess`` starts first thing (flows._tempserver), in fresh processes.

Prefect reads its settings once, at import, so each case runs in a child
process with the environment it is about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, os, urllib.request
import subprocess
import psutil
import flows._tempserver as ts
from flows._tempserver import early_server

spawned = []
_popen = subprocess.Popen
def counting_popen(*a, **k):
    spawned.append(a[0])
    return _popen(*a, **k)
ts.subprocess.Popen = counting_popen

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
out["spawned"] = len(spawned)
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
    assert out["server"] and out["health"] == 200 and out["api_answers"] and out["spawned"] == 1
    assert out["children_after"] == []  # stopped and reaped
    assert not Path(f"/proc/{out['pid']}").exists()
    assert (tmp_path / "home" / "prefect.db").exists()  # its database is the one Prefect's own would use


def test_an_api_url_in_the_environment_starts_no_server(tmp_path):
    env = _env(tmp_path / "home")
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    assert _probe(env) == {"server": False, "children_after": [], "spawned": 0}


def test_an_api_url_in_the_active_profile_stops_the_server_started_first(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "station"\n\n[profiles.station]\n'
                                        'PREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    out = _probe(_env(home))
    assert out == {"server": False, "children_after": [], "spawned": 1}  # started on the environment's word, stopped


def test_a_profile_that_allows_no_temporary_server_gets_none(tmp_path):
    """``PREFECT_SERVER_EPHEMERAL_ENABLED`` false and no URL: no server (Prefect then refuses, as it always did)."""
    env = _env(tmp_path / "home")
    env["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    assert _probe(env) == {"server": False, "children_after": [], "spawned": 1}


@pytest.mark.prefect
def test_a_server_that_cannot_start_is_a_clear_error_and_starts_nothing(pristine_night, tmp_path):
    """Its database cannot be opened: exit 1 with a message that says what to do; no run, no process left."""
    from flowkit import fresh_copy, mascprocess

    env = _env(tmp_path / "home")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}"
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    before = sorted(p.relative_to(datadir) for p in datadir.rglob("*"))
    t0 = time.perf_counter()
    res = mascprocess(datadir, env, "-q", check=False, timeout=600)
    print(f"failed after {time.perf_counter() - t0:.1f} s")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "the temporary Prefect server exited with code" in res.stderr and "--no-prefect" in res.stderr
    assert "Traceback" not in res.stderr.split("mascprocess:")[-1]
    assert sorted(p.relative_to(datadir) for p in datadir.rglob("*")) == before  # nothing written, nothing moved
    assert _servers_of(tmp_path / "home") == []


def _servers_of(home: Path) -> list[int]:
    """Pids of Prefect server processes with this PREFECT_HOME."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or []) \
                    and p.environ().get("PREFECT_HOME") == str(home):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.mark.prefect
def test_the_server_goes_when_mascprocess_is_killed_outright(pristine_night, tmp_path):
    """SIGKILL reaches no handler: the server must not outlive mascprocess (Prefect's own does)."""
    from flowkit import BIN, NIGHT, fresh_copy

    home = tmp_path / "home"
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "-q"]
    proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.perf_counter()
    while not _batch_started(datadir):  # the server answered and the flow is reducing
        assert proc.poll() is None and time.perf_counter() - t0 < 300
        time.sleep(0.3)
    try:
        (server,) = _servers_of(home)
        proc.kill()
        proc.wait()
        t0 = time.perf_counter()
        while _alive(server):
            assert time.perf_counter() - t0 < 30, "the temporary server outlived mascprocess"
            time.sleep(0.2)
        print(f"server gone {time.perf_counter() - t0:.1f} s after mascprocess was killed")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        for pid in _servers_of(home):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _batch_started(datadir: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{datadir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM batch WHERE status IN ('running', 'succeeded')").fetchone()[0] > 0
    except sqlite3.OperationalError:  # not created yet
        return False


@pytest.mark.prefect
def test_a_package_named_like_prefect_in_the_working_directory_does_not_replace_the_servers(tmp_path):
    """A review: the server's launcher imported Prefect before uvicorn put its ``--app-dir`` first on the path,
    so the working directory's ``prefect/`` (``python -c`` puts it first) was imported instead: no server."""
    fake = tmp_path / "cwd" / "prefect"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the working directory prefect package was imported')\n")
    probe = ("from flows._tempserver import TemporaryServer\n"
             "import urllib.request\n"
             "s = TemporaryServer()\n"
             "try:\n"
             "    s.wait(180)\n"
             "    print(urllib.request.urlopen(s.api_url + '/health', timeout=5).status)\n"
             "finally:\n"
             "    s.stop()\n")
    # -P and a PYTHONPATH without an empty entry: the probe itself finds the installed Prefect; the server it
    # starts runs in the same directory
    env = _env(tmp_path / "home")
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-P", "-c", probe], env=env, capture_output=True, text=True,
                         cwd=str(fake.parent), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "200"
