"""Abandon a translation in progress when the node stops, between two tensor operations.

Why: a translation of a large image takes seconds to minutes on a CPU.  SIGTERM used to wait
for it (up to the stop timeout), then ended the process with the translation still running
in a daemon thread, which PyTorch answers with "terminate called without an active
exception" (an abort, not exit 0).  Abandoning it is safe: the item's claim is given back,
it stays ``ready``, and re-translating at the next start writes the same output UIDs.

How: a ``TorchFunctionMode`` sees every torch call of the thread that entered it (modes are
thread-local), so the whole-image pass and the tiled executor, which calls ``F.conv2d``
directly rather than modules, are both interrupted within one operation (measured: 9 ms
after the stop).  Cost: ~5 us per tensor operation; a whole-image pass makes ~110 of them,
the tiled executor ~5,600 for 1024 x 1024 in 256 px tiles (~30 ms of a 4 s translation).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only at run time, inside the function (status and retry start without it)
    from torch.overrides import TorchFunctionMode

__all__ = ["TranslationStopped", "stop_between_operations"]


class TranslationStopped(Exception):
    """The node is stopping: the translation was abandoned; its item stays for the next start."""


def stop_between_operations(stop: threading.Event) -> TorchFunctionMode:
    """A context manager: inside it, this thread's next torch operation after ``stop`` is set
    raises :class:`TranslationStopped`."""
    from torch.overrides import TorchFunctionMode

    class _StopMode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
            if stop.is_set():
                raise TranslationStopped()
            return func(*args, **(kwargs or {}))

    return _StopMode()
