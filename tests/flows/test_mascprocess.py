"""``mascprocess`` with no Prefect server to start (ephemeral mode), then ``mascara status``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from flowkit import BIN, NIGHT_ID, assert_same_night_files, fresh_copy, mascprocess, night_status


@pytest.mark.prefect
@pytest.mark.slow
def test_mascprocess_runs_without_a_server_and_status_shows_it(prefect_server, pristine_night, reference, tmp_path):
    _, env = prefect_server
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}  # Prefect starts a temporary server itself
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = mascprocess(datadir, env, "-v")  # -v: Prefect's INFO logs go to the server too, up to the flow's last
    print(f"mascprocess in ephemeral mode: {res.seconds:.1f} s")
    assert "120/120" in res.stdout and "3/3 batches" in res.stdout  # the progress bar's last state
    assert night_status(datadir)["state"] == "succeeded"
    status = subprocess.run([str(BIN / "mascara"), "status", str(datadir), "--json"], env=env, capture_output=True,
                            text=True, check=True)
    (row,) = json.loads(status.stdout)
    assert (row["camera"], row["state"], row["batches_done"], row["frames_ok"]) == ("LPE", "succeeded", 3, 120)
    assert_same_night_files(datadir / NIGHT_ID, reference)
    # the run went to the temporary server mascprocess started, whose database is Prefect's own in PREFECT_HOME
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        flows = db.execute("SELECT fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
                           "WHERE f.name = 'reduce-night'").fetchall()
        batches = db.execute("SELECT COUNT(*) FROM task_run WHERE name LIKE 'batch-%' "
                             "AND state_type = 'COMPLETED'").fetchone()[0]
        last = db.execute("SELECT message FROM log ORDER BY timestamp DESC LIMIT 1").fetchone()
    assert flows == [("COMPLETED",)] and batches == 3
    # the logs Prefect still held when the flow ended were sent before the server stopped
    assert "Error logging to API" not in res.stderr
    assert "Starting temporary server" not in res.stderr  # Prefect's INFO line when it starts one of its own
    assert last is not None and "Finished in state Completed" in last[0]


def test_missing_data_directory_is_reported(tmp_path):
    res = subprocess.run([str(BIN / "mascprocess"), str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert res.returncode != 0 and "does not exist" in res.stderr


@pytest.mark.parametrize("driver", [["--no-prefect"], []], ids=["library", "prefect"])
def test_a_selected_camera_without_a_directory_is_recorded_empty_by_both_drivers(driver, pristine_night, tmp_path,
                                                                                prefect_server):
    """``--camera E+S`` on a night where camera S made no directory: E is reduced, S is recorded ``empty``
    (no night directory) and the exit code is 1, whichever driver ran (the library driver recorded nothing)."""
    from flowkit import NIGHT

    from mascara.catalog import connect

    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = subprocess.run([str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E+S", "--site", "LP",
                          "-q", *driver], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"no night directory {NIGHT}LPS" in res.stderr
    with connect(datadir=datadir) as cat:
        rows = {r["camera"]: r for r in cat.night_status(NIGHT)}
    assert rows["LPE"]["state"] == "succeeded"
    assert rows["LPS"]["state"] == "empty" and "no night directory" in rows["LPS"]["error"], rows["LPS"]


@pytest.mark.parametrize("driver", [["--no-prefect"], []], ids=["library", "prefect"])
def test_the_catalog_is_whole_in_its_one_file_when_the_command_has_ended(driver, pristine_night, tmp_path,
                                                                        prefect_server):
    """A review of the collector change: its engine, held in a reference cycle, was closed only by the
    interpreter's last collection, which the command now skips; the catalog's data stayed in
    ``catalog.sqlite-wal`` and a copy of ``catalog.sqlite`` alone (a backup) held no table at all."""
    from flowkit import NIGHT

    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = subprocess.run([str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "-q", *driver], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in datadir.glob("catalog.sqlite*")) == ["catalog.sqlite"]
    backup = tmp_path / "backup.sqlite"
    backup.write_bytes((datadir / "catalog.sqlite").read_bytes())
    with sqlite3.connect(backup) as db:
        runs = db.execute("SELECT status FROM reduction_run").fetchall()
    assert runs == [("succeeded",)]


def test_the_progress_bar_says_how_many_frames_were_rejected():
    """An outside trial: the bar read '120/120 frames ... succeeded' for a night with 3 frames rejected."""
    from flows.mascprocess import RichProgress

    bars = RichProgress()
    bars.night_planned("20260301LPE", 120, 3)
    bars.batch_done("20260301LPE", 50, True, 2)
    bars.batch_done("20260301LPE", 50, False)
    bars.batch_done("20260301LPE", 20, True, 1)
    (task,) = bars.progress.tasks
    assert task.completed == 70 and task.total == 120
    assert task.fields["batches"] == "2/3 batches, 1 failed, 3 frames rejected"


_HEALTH_PROBE = """
from flows.mascprocess import _silent_prefect_server
print(repr(_silent_prefect_server()))
"""


def _health_answer(url: str) -> str:
    import os

    res = subprocess.run([sys.executable, "-c", _HEALTH_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PREFECT_API_URL": url})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_prefect_server_check_takes_any_http_answer_and_names_what_is_silent(tmp_path):
    """``mascprocess``'s check of the server PREFECT_API_URL names: a server that answers, even with an
    error (one that wants a key says so itself), is used; one that refuses the connection or closes it
    without an answer is named in one line. Real sockets: a small HTTP server and a bare listener."""
    import http.server
    import socket
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            seen.append(self.path)
            self.send_response(401 if "key" in self.path else 200)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closing = socket.socket()
    closing.bind(("127.0.0.1", 0))
    closing.listen()

    def hang_up():
        while True:
            try:
                conn, _ = closing.accept()
            except OSError:
                return
            conn.recv(1024)
            conn.close()  # no status line

    threading.Thread(target=hang_up, daemon=True).start()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        refused = s.getsockname()[1]
    try:
        port = server.server_address[1]
        assert _health_answer(f"http://127.0.0.1:{port}/api") == "None"
        assert _health_answer(f"http://127.0.0.1:{port}/key/api") == "None"
        assert seen == ["/api/health", "/key/api/health"]
        silent = _health_answer(f"http://127.0.0.1:{refused}/api")
        assert silent.startswith(f"'the Prefect server at http://127.0.0.1:{refused}/api does not answer (")
        assert "Connection refused" in silent and "--no-prefect" in silent, silent
        url = f"http://127.0.0.1:{closing.getsockname()[1]}/api"
        silent = _health_answer(url)
        assert silent.startswith(f"'the Prefect server at {url} does not answer ("), silent
    finally:
        server.shutdown()
        closing.close()
