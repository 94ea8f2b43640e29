"""Python's cyclic garbage collector in the product's own command processes (issue 12).

A ``mascprocess`` process loads a few hundred thousand long-lived objects
(astropy, SQLAlchemy, pydantic, Prefect) that never become garbage. The
collector walks all of them in every full collection: while the modules
load, a few times during the night, and once more when the interpreter
shuts down. Measured on a 114-frame night (issue 12 notes, ``bench/``):
full collections took 0.6 s (library driver) and 1.0 s (Prefect flow) of a
run, and the shutdown's collection another 0.9 s and 1.4 s after the last
line was printed.

So a command's process

- loads its modules with the collector off (:func:`loading`): imports make
  almost no cyclic garbage;
- then hands everything alive to the permanent generation, which no
  collection walks, and turns the collector back on for what the night
  allocates (:func:`settled`);
- and does the same once its work is done (:func:`exiting`), so that the
  interpreter's shutdown does not walk the heap once more.

Nothing is freed later than it would have been: objects freed by their
reference count go at once as before; only cyclic garbage alive at those two
moments stays until the process ends. Files are closed by the code that
opened them, never by a collection.

Only a process whose entry point called :func:`loading` (the console
commands, the splitter process) is affected: the functions do nothing in a
process that merely calls the library, a test runner for instance. A
command's handler is told its modules are loaded as soon as its own module
is imported (``mascara.cli._dispatch``), except ``mascprocess``, whose
reduction paths say so themselves once the science modules (and, for the
flow, Prefect) are loaded: no path of a command runs for long with the
collector off.
"""

from __future__ import annotations

import gc

_OWN = False


def loading() -> None:
    """The process is a command of this package: no collections while it imports its modules."""
    global _OWN
    _OWN = True
    gc.disable()


def adopt() -> None:
    """A process of this package started by another one (the splitter), its modules loaded: as :func:`settled`."""
    global _OWN
    _OWN = True
    settled()


def settled() -> None:
    """The modules are loaded: keep what is alive out of later collections, and collect again."""
    if _OWN:
        gc.freeze()
        gc.enable()


def exiting() -> None:
    """The work is done: no collection over the whole heap at interpreter shutdown."""
    if _OWN:
        gc.freeze()
