"""Fixtures of the orchestration tests: one real Prefect server per session, tiny simulated nights.

Everything runs for real: ``prefect server start`` with a private PREFECT_HOME
on a free port, a process worker, ``mascprocess`` in subprocesses, a Dask
cluster.  The science is tested elsewhere; here only the orchestration is.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from flowkit import BIN, NIGHT, NIGHT_ID, SERVER_START_TIMEOUT, free_port, fresh_copy, mascprocess, stop_process_group


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server: yields ``(api_url, env)`` where env is for clients (subprocesses)."""
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MASCARA_DB_URL", "MASCARA_FLOW_FAULT"))}
    base.update({
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    })
    server_env = {**base, "PREFECT_UI_API_URL": api}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > SERVER_START_TIMEOUT:
            log.close()
            raise RuntimeError(f"prefect server did not start: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    print(f"prefect server healthy after {time.perf_counter() - t0:.1f} s on port {port}")
    client_env = {**base, "PREFECT_API_URL": api,
                  "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "results"),
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                  "MASCARA_RETRY_BACKOFF": "0.5"}
    yield api, client_env
    stop_process_group(proc)
    log.close()


@pytest.fixture(scope="session")
def pristine_night(tmp_path_factory) -> Path:
    """A simulated small night of camera LPE (120 frames: 3 batches); copy it before use."""
    datadir = tmp_path_factory.mktemp("pristine")
    subprocess.run([str(BIN / "mascara"), "simulate", str(datadir), "--night", NIGHT, "--site", "LP", "--camera", "E",
                    "--size", "small", "--frames", "120", "--seed", "3"], check=True, capture_output=True)
    return datadir


@pytest.fixture(scope="session")
def reference(pristine_night, tmp_path_factory, prefect_server) -> Path:
    """The night reduced without interruption by the plain library driver (``--no-prefect``)."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path_factory.mktemp("reference") / "data")
    res = mascprocess(datadir, env, "--no-prefect", "-q")
    print(f"reference (--no-prefect) reduction: {res.seconds:.1f} s")  # type: ignore[attr-defined]
    return datadir / NIGHT_ID


