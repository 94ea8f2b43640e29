"""The garbage collector's policy in the package's own processes (mascara._collector)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from mascara import _collector


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_process_that_only_calls_the_library_keeps_its_collector_as_it_was():
    # a test runner, a notebook: nothing frozen, nothing turned off
    before = gc.get_freeze_count()
    _collector.settled()
    _collector.exiting()
    assert gc.isenabled()
    assert gc.get_freeze_count() == before


def test_a_command_loads_without_collections_then_collects_only_what_the_night_allocates():
    out = _run("""
        import gc
        from mascara import _collector
        _collector.loading()
        off = not gc.isenabled()
        import mascara.reduce  # the modules a reduction loads
        _collector.settled()
        print(off, gc.isenabled(), gc.get_freeze_count() > 100_000)
    """)
    assert out == "True True True"


def test_the_console_commands_freeze_the_heap_before_the_interpreter_shuts_down():
    # the console entry points (pyproject's [project.scripts]) leave nothing for the shutdown's collection to
    # walk, also when the command ends on an exception (argparse's exit for --help)
    out = _run("""
        import contextlib, gc, io, sys
        import mascara.cli as cli
        sys.argv = ["mascprocess", "--help"]
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.mascprocess_command()
            except SystemExit as exc:
                code = exc.code
        print(code, gc.isenabled(), gc.get_freeze_count() > 1_000)
    """)
    assert out == "0 False True"


def test_the_console_scripts_are_the_wrapped_entry_points():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name in ("mascara", "mascprocess")}
    assert scripts == {"mascara": "mascara.cli:mascara_command", "mascprocess": "mascara.cli:mascprocess_command"}


def test_every_long_path_of_a_command_collects_again(tmp_path):
    # the collector is off only while a command imports: a handler that does not say when its modules are
    # loaded is run with it on, and so are the paths of mascprocess that run for long (here --live)
    (tmp_path / "probe.py").write_text("import gc\ndef handler(args):\n    return 0 if gc.isenabled() else 7\n")
    out = _run(f"""
        import argparse, gc, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import mascara.cli as cli
        import flows.mascprocess as mp
        other = cli._command(lambda: cli._dispatch(argparse.Namespace(handler="probe:handler")))
        mp.run_live = lambda args: 0 if gc.isenabled() else 7
        live = cli._command(lambda: cli.mascprocess_main([{str(tmp_path)!r}, "--live"]))
        print(other, live)
    """)
    assert out == "0 0"
