"""The module's public surface: what __all__ exports."""

from __future__ import annotations

import task_queue_optimized as tq


def test_every_public_class_function_and_default_is_in_all() -> None:
    """Public names (ErrorKind among them) are exported; __all__ names only what exists."""
    defined = {
        name
        for name, value in vars(tq).items()
        if not name.startswith("_")
        and (
            (callable(value) and getattr(value, "__module__", None) == tq.__name__)
            or name.startswith(("DEFAULT_", "MAX_"))
        )
    }
    assert "ErrorKind" in defined
    tuning = {"MAX_BATCH", "MAX_COMPLETION_BATCH", "MAX_ECHO_CHARS", "MAX_PREFETCH"}
    assert defined - tuning <= set(tq.__all__)
    assert all(hasattr(tq, name) for name in tq.__all__)
