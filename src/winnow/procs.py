"""Worker processes that never re-run the user's script.

Python's ``spawn`` and ``forkserver`` start methods import the parent's ``__main__`` in every worker,
so a script that calls ``sampling_main(...)`` at top level, without an ``if __name__ ==
"__main__":`` guard (as swift's users write them), would start the run again in each worker and
crash. winnow's workers run only winnow functions, so their processes are started with the main
module hidden from the preparation data: nothing of the user's script runs in them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.context as mp_context
import sys
import threading

_hiding = threading.Lock()


@contextlib.contextmanager
def _main_hidden():
    """Hide ``__main__``'s file and spec while a worker's preparation data is gathered."""
    main = sys.modules.get("__main__")
    with _hiding:
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(main, k, v)


class _ForkServerProcess(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        with _main_hidden():
            return mp_context.ForkServerProcess._Popen(process_obj)


class _SpawnProcess(mp_context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj):
        with _main_hidden():
            return mp_context.SpawnProcess._Popen(process_obj)


class _ForkServerContext(mp_context.ForkServerContext):
    Process = _ForkServerProcess


class _SpawnContext(mp_context.SpawnContext):
    Process = _SpawnProcess


def worker_context() -> mp_context.BaseContext:
    """A multiprocessing context for winnow's worker pools: forkserver where the platform has it (workers
    never inherit the parent's threads, torch state or CUDA), else spawn; the user's ``__main__`` is not
    imported in the workers."""
    if "forkserver" in mp.get_all_start_methods():
        return _ForkServerContext()
    return _SpawnContext()
