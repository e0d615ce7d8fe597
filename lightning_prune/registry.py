"""Name → implementation tables: one-shot methods, mask refiners, criteria, structured scores.

A method is one unit found by name (peft's `register_peft_method`, llm-compressor's folder per
modifier): the file that defines a built-in registers it, callers look it up and never branch on
the name. Users register their own without touching the package::

    from lightning_prune import OneShotMethod, register_method

    @register_method("my_method")
    class MyMethod(OneShotMethod):
        statistics = (FeatureNormStats,)
        def prune(self, weight, stats, sparsity, pattern): ...

    prune_oneshot(model, batches, method="my_method")   # or `pruning.method=my_method` in YAML

Registered values are classes (factories); `Registry.create(name, **options)` builds one, and an
instance passes through unchanged, so every API takes a name or a ready object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named factories of one kind; lookups raise a `ValueError` listing what exists."""

    def __init__(self, kind: str, argument: str) -> None:
        self.kind = kind
        self.argument = argument
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[type[T]], type[T]]:
        """Class decorator: make the class available as `name` (an error if taken, unless `overwrite`)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(factory: type[T]) -> type[T]:
            if name in self._entries and not overwrite and self._entries[name] is not factory:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered ({self._entries[name].__qualname__}); "
                    "pass overwrite=True to replace it"
                )
            self._entries[name] = factory
            if getattr(factory, "name", None) in (None, ""):
                factory.name = name  # type: ignore[attr-defined]
            return factory

        return add

    def unregister(self, name: str) -> None:
        """Remove `name` (tests and plugins that clean up after themselves)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> type[T]:
        """The factory registered as `name`."""
        if name not in self._entries:
            raise ValueError(f"`{self.argument}` must be one of {self.names()} (registered {self.kind}s), got {name!r}")
        return self._entries[name]

    def create(self, spec: str | T, **options: Any) -> T:
        """An instance from a registered name and its options, or `spec` itself when already built."""
        if not isinstance(spec, str):
            if options:
                raise ValueError(
                    f"`{self.argument}` is an already built {self.kind}; "
                    f"options {sorted(options)} cannot be applied to it"
                )
            return spec
        factory = self.get(spec)
        try:
            return factory(**options)
        except TypeError as error:
            raise ValueError(f"{self.kind} {spec!r} does not take the options {sorted(options)}: {error}") from error

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return repr(self.names())


# The tables; each built-in registers itself in the module that defines it.
ONESHOT_METHODS: Registry[Any] = Registry("one-shot method", "method")
MASK_REFINERS: Registry[Any] = Registry("mask refinement", "refine")
CRITERIA: Registry[Any] = Registry("criterion", "criterion")
STRUCTURED_SCORES: Registry[Any] = Registry("structured score", "method")


def register_method(name: str, *, overwrite: bool = False) -> Callable[[type[T]], type[T]]:
    """Register a one-shot pruning method (a subclass of `lightning_prune.oneshot.OneShotMethod`)."""
    return ONESHOT_METHODS.register(name, overwrite=overwrite)


def register_refiner(name: str, *, overwrite: bool = False) -> Callable[[type[T]], type[T]]:
    """Register a training-free mask refinement (a subclass of `lightning_prune.oneshot.MaskRefiner`)."""
    return MASK_REFINERS.register(name, overwrite=overwrite)


def register_criterion(name: str, *, overwrite: bool = False) -> Callable[[type[T]], type[T]]:
    """Register a training-time importance criterion (a subclass of `lightning_prune.criteria.Criterion`)."""
    return CRITERIA.register(name, overwrite=overwrite)


def register_structured_score(name: str, *, overwrite: bool = False) -> Callable[[type[T]], type[T]]:
    """Register a structured-pruning group score (see `lightning_prune.structured`)."""
    return STRUCTURED_SCORES.register(name, overwrite=overwrite)
