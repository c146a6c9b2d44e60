"""One simulation per process.

SimGrid keeps one engine per process: a second ``simgrid.Engine`` reuses the
first one's clock and platform.  So every simulation (a replay, a test's
platform) runs in a forked child: :func:`run_isolated` calls ``fn(*args)``
there and returns its result (pickled back through a pipe) or raises its
exception here.  The parent never imports SimGrid.  A child that dies
without an answer (SimGrid aborts the process on some errors, after printing
why) is a :class:`~sim.network.SimulationError` with its exit code.  An
interrupted parent ends the child at once: that replay's directory then holds
the records written so far, and ``netkv report`` marks it partial.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from typing import Any, Callable, TypeVar

from .network import SimulationError

T = TypeVar("T")
JOIN_S = 10.0


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        result: tuple[str, Any] = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        text = traceback.format_exc()
        try:
            pickle.dumps(exc)
            result = ("error", (exc, text))
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
            result = ("error", (SimulationError(f"{type(exc).__name__}: {exc}"), text))
    try:
        conn.send(result)
    finally:
        conn.close()


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a forked child process; its result or its exception."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args, kwargs), name="netkv-sim")
    proc.start()
    sender.close()
    try:
        kind, value = receiver.recv()
    except EOFError:
        proc.join(JOIN_S)
        raise SimulationError(f"the simulation process {proc.pid} ended without an answer "
                              f"(exit code {proc.exitcode}); SimGrid's message is above") from None
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): end the child, by its own pid
        if proc.is_alive():
            proc.terminate()
        raise
    finally:
        receiver.close()
        proc.join(JOIN_S)
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    exc, text = value
    if os.environ.get("NETKV_SIM_TRACEBACK"):
        print(text)
    raise exc
