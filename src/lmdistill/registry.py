"""Registry of distillation methods, by name.

A method is an ``nn.Module`` registered with ``@register("name", kind="embedding"|"lm")``. Its
``Options`` dataclass declares its configuration keys (unknown keys are refused).
"""

from __future__ import annotations

from collections.abc import Callable

from lmdistill.errors import LmdistillError

_METHODS: dict[str, dict[str, type]] = {"embedding": {}, "lm": {}}


def register(name: str, kind: str) -> Callable[[type], type]:
    """Class decorator that registers a method under ``name`` for the task ``kind``."""

    def wrap(cls: type) -> type:
        if name in _METHODS[kind]:
            raise ValueError(f"method {name!r} registered twice")
        cls.method_name = name
        _METHODS[kind][name] = cls
        return cls

    return wrap


def _load_all() -> None:
    # Importing the packages runs the @register decorators.
    import lmdistill.methods.embedding  # noqa: F401
    import lmdistill.methods.llm  # noqa: F401


def get_method(name: str, kind: str) -> type:
    """The method class registered as ``name`` for ``kind``; a clear error if unknown."""
    _load_all()
    if name not in _METHODS[kind]:
        known = ", ".join(sorted(_METHODS[kind]))
        raise LmdistillError(f"unknown {kind} method {name!r}: choose one of {known}")
    return _METHODS[kind][name]


def list_methods(kind: str) -> list[str]:
    """Names of the registered methods of ``kind``."""
    _load_all()
    return sorted(_METHODS[kind])
