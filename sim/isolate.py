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

import gc
import multiprocessing
import os
import pickle
import traceback
from typing import Any, Callable, TypeVar

from .network import SimulationError

T = TypeVar("T")
JOIN_S = 10.0


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    import signal

    # a zygote's child inherits its handlers: back to the defaults, so that the parent's
    # terminate() ends it (a Python handler would wait for the main thread, which SimGrid's
    # engine holds until the simulation ends)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
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


def _spawn(ctx: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``fn(*args, **kwargs)`` started in a forked child: (the process, the end its answer comes on)."""
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args, kwargs), name="netkv-sim")
    proc.start()
    sender.close()
    return proc, receiver


def _answer_of(proc: Any, receiver: Any) -> tuple[str, Any]:
    """The child's answer, ("error", ...) when it ended without one; the child is joined."""
    try:
        answer: tuple[str, Any] = receiver.recv()
    except EOFError:
        proc.join(JOIN_S)
        answer = ("error", (SimulationError(
            f"the simulation process {proc.pid} ended without an answer (exit code {proc.exitcode}); "
            f"SimGrid's message is above"), ""))
    finally:
        receiver.close()
    proc.join(JOIN_S)
    return answer


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a forked child process; its result or its exception."""
    proc, receiver = _spawn(multiprocessing.get_context("fork"), fn, args, kwargs)
    try:
        kind, value = _answer_of(proc, receiver)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): end the child, by its own pid
        if proc.is_alive():
            proc.terminate()
            proc.join(JOIN_S)
        raise
    return _result(kind, value)  # type: ignore[no-any-return]


def _result(kind: str, value: Any) -> Any:
    """A child's answer: its result, or its exception raised here (with the
    child's traceback printed when NETKV_SIM_TRACEBACK is set)."""
    if kind == "ok":
        return value
    exc, text = value
    if os.environ.get("NETKV_SIM_TRACEBACK"):
        print(text)
    raise exc


# -- one platform, many replays ---------------------------------------------------------------
def _zygote_main(conn: Any, build: Callable[[], Any]) -> None:
    """The zygote's loop: build once, then one forked child per request, each
    starting from the built state (copy-on-write), one at a time."""
    import signal

    ctx = multiprocessing.get_context("fork")
    current: list[Any] = []

    def stop(signum: int, frame: Any) -> None:  # the parent ends us: end the replay running, by its pid
        for proc in current:
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_S)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends us
    try:
        state = build()
    except BaseException as exc:  # noqa: BLE001 - the first request's answer says why
        text = traceback.format_exc()
        failed: tuple[str, Any] = ("error", (SimulationError(f"building the platform failed: "
                                                             f"{type(exc).__name__}: {exc}"), text))
        conn.send(failed)
        conn.close()
        return
    # what the build made lives as long as the zygote: out of the collector's reach, so that no
    # child's collection walks it (millions of routes and paths at 4,096 GPUs) or copies its pages
    gc.freeze()
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        fn, args, kwargs = request
        proc, receiver = _spawn(ctx, fn, (state, *args), kwargs)
        current[:] = [proc]
        answer = _answer_of(proc, receiver)
        current[:] = []
        conn.send(answer)


class Zygote:
    """A process that builds a simulation's platform once (``build()``, in
    the zygote) and runs each replay in a child forked from it:
    ``run(fn, *args)`` calls ``fn(state, *args)`` there, with ``state`` what
    ``build`` returned, and returns its result or raises its exception here.

    A platform of 4,096 GPUs took 3.3 minutes to build here and one of 8,192
    GPUs 13; a campaign's replays of one experiment share it.  SimGrid starts
    no thread before its engine runs, and the engine runs only in the children,
    so each child has the built platform to itself.  ``key`` names what was
    built (the caller compares it before reusing the zygote)."""

    def __init__(self, key: Any, build: Callable[[], Any]) -> None:
        self.key = key
        ctx = multiprocessing.get_context("fork")
        self._conn, theirs = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_zygote_main, args=(theirs, build), name="netkv-sim-zygote")
        self._proc.start()
        theirs.close()
        self._ready = False
        self._busy = False  # a request sent, its answer not yet read

    def _answer(self) -> tuple[str, Any]:
        try:
            answer: tuple[str, Any] = self._conn.recv()
            return answer
        except EOFError:
            self._proc.join(JOIN_S)
            raise SimulationError(f"the simulation's platform process {self._proc.pid} ended without an answer "
                                  f"(exit code {self._proc.exitcode}); SimGrid's message is above") from None
        except BaseException:  # interrupted: end the zygote (it ends its child), by its own pid
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(JOIN_S)
            raise

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._ready:
            kind, value = self._answer()
            if kind != "ready":
                self.close()
                _result(kind, value)
            self._ready = True
        self._busy = True
        try:
            self._conn.send((fn, args, kwargs))
            return _result(*self._answer())  # type: ignore[no-any-return]
        finally:
            self._busy = False

    def close(self) -> None:
        """End the zygote: asked first when it is idle, else (a replay under
        way, run from another thread) at once, by its pid: it ends that
        replay's process by its pid."""
        if self._proc.is_alive():
            if not self._busy:
                try:
                    self._conn.send(None)
                except (OSError, ValueError):
                    pass
                self._proc.join(JOIN_S)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(JOIN_S)
        self._conn.close()
