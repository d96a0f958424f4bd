"""Methods under evaluation: a prefill patch and/or a KV-cache policy, and the name registry of the CLI.

A :class:`Method` says how prefill runs and which cache decoding uses:

* ``prefill``: ``None`` (dense), a :class:`Patch` (any ``patch(model) -> model`` / ``unpatch(model)``
  pair), a :class:`PatternPrefill` (one :class:`~flexinference.patterns.Pattern` on every head:
  ``flexinference.apply(model, pattern, **options)``), or any other object, handed to
  ``flexinference.apply(model, prefill)`` as its config. ``flexinference.apply``/``remove`` are looked up
  when the method is applied, not at import.
* ``cache_factory``: ``None`` (a ``DynamicCache``) or a callable returning a transformers ``Cache``; it
  receives ``config=model.config`` when its signature has a ``config`` parameter, else no argument.
* ``cache_attach``: ``None`` or ``attach(model, cache) -> context manager``, entered around every use
  of a cache object (the shared one and each copy); the flexinference policies need
  ``flexinference.cache.attach`` (query capture for SnapKV/PyramidKV, the model config for PyramidKV).

The registry (:data:`METHODS`, name -> factory ``(**kwargs) -> Method``) serves the CLI's ``--methods``.
Names joined with ``+`` combine one prefill method with one cache method (``minference+snapkv``).
Cache factories import from ``flexinference.cache`` lazily; a class that is not there makes the method
*unavailable* (:class:`MethodUnavailableError`), never a silent fallback to dense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "METHODS",
    "Method",
    "MethodUnavailableError",
    "Patch",
    "PatternPrefill",
    "build_method",
    "register_method",
]


class MethodUnavailableError(RuntimeError):
    """A known method whose implementation is not importable in this installation."""


@dataclass(frozen=True)
class Patch:
    """A prefill patch given as two callables: ``patch(model) -> model`` and ``unpatch(model)``."""

    patch: Callable[[Any], Any]
    unpatch: Callable[[Any], Any]

    def __post_init__(self) -> None:
        for name in ("patch", "unpatch"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Patch.{name} must be callable, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PatternPrefill:
    """One sparse pattern on every head of every layer: ``flexinference.apply(model, pattern, **options)``.

    Attributes:
        pattern: a :class:`~flexinference.patterns.Pattern`.
        options: ``apply`` overrides (``min_sparse_len``, ``prefill_chunk_size``, ``impl``).
    """

    pattern: Any
    options: Mapping[str, Any] = field(default_factory=dict)


def _flexinference_api(method: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``flexinference.apply`` / ``flexinference.remove``, looked up at call time (so they can be wrapped)."""
    import flexinference

    return flexinference.apply, flexinference.remove


@dataclass(frozen=True)
class Method:
    """A named method: prefill patch and/or cache policy (see the module docstring).

    Example::

        Method("dense")
        Method("snapkv", cache_factory=lambda: SnapKVCache(budget=1024), cache_attach=flexinference.cache.attach)
        Method("my_patch", prefill=Patch(my_patch, my_unpatch))
    """

    name: str
    prefill: Any = None
    cache_factory: Callable[..., Any] | None = None
    cache_attach: Callable[[Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Method.name must be a non-empty string, got {self.name!r}")
        for name in ("cache_factory", "cache_attach"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"Method.{name} must be callable or None, got {value!r}")

    def attached(self, model: Any, cache: Any) -> Any:
        """Context manager around the use of ``cache`` with ``model`` (``cache_attach``, or nothing)."""
        if self.cache_attach is None:
            return contextlib.nullcontext(cache)
        return self.cache_attach(model, cache)

    def check_available(self) -> None:
        """Raise :class:`MethodUnavailableError` now if applying would fail for a missing piece."""
        if self.prefill is not None and not isinstance(self.prefill, Patch) and not _has_patch(self.prefill):
            _flexinference_api(self.name)

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Patch ``model`` for this method's prefill, yield the model to run, undo on exit."""
        if self.prefill is None:
            yield model
            return
        if isinstance(self.prefill, Patch) or _has_patch(self.prefill):
            patched = self.prefill.patch(model)
            patched = model if patched is None else patched
            try:
                yield patched
            finally:
                self.prefill.unpatch(patched)
            return
        apply, remove = _flexinference_api(self.name)
        if isinstance(self.prefill, PatternPrefill):
            patched = apply(model, self.prefill.pattern, **dict(self.prefill.options))
        else:
            patched = apply(model, self.prefill)
        patched = model if patched is None else patched
        try:
            yield patched
        finally:
            remove(patched)

    def new_cache(self, model: Any) -> Any:
        """A fresh cache for one record: ``cache_factory`` (given ``config=`` if it takes one) or a
        ``DynamicCache`` built for the model's config."""
        if self.cache_factory is None:
            from transformers import DynamicCache

            return DynamicCache(config=model.config)
        try:
            params = inspect.signature(self.cache_factory).parameters
        except (TypeError, ValueError):
            params = {}
        if "config" in params:
            return self.cache_factory(config=model.config)
        return self.cache_factory()


def _has_patch(obj: Any) -> bool:
    return callable(getattr(obj, "patch", None)) and callable(getattr(obj, "unpatch", None))


# -- registry ---------------------------------------------------------------------------------------------

MethodFactory = Callable[..., Method]


def _dense(**kwargs: Any) -> Method:
    if kwargs:
        raise ValueError(f"method 'dense' takes no arguments, got {sorted(kwargs)}")
    return Method("dense")


def _pattern_method(name: str, make: Callable[..., Any]) -> MethodFactory:
    def factory(**kwargs: Any) -> Method:
        options = dict(kwargs.pop("apply_options", {}) or {})
        return Method(name, prefill=PatternPrefill(make(**kwargs), options))

    factory.__name__ = f"{name}_factory"
    return factory


def _pattern(cls_name: str, preset: str | None = None) -> Callable[..., Any]:
    def make(**kwargs: Any) -> Any:
        from flexinference import patterns

        cls = getattr(patterns, cls_name)
        base = getattr(cls, preset)() if preset else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base

    return make


def _policy_attach(model: Any, cache: Any) -> Any:
    from flexinference.cache import attach

    return attach(model, cache)


def _cache_method(name: str, cls_name: str) -> MethodFactory:
    def factory(**kwargs: Any) -> Method:
        try:
            module = importlib.import_module("flexinference.cache")
            cls = getattr(module, cls_name)
        except (ImportError, AttributeError) as e:
            raise MethodUnavailableError(
                f"method {name!r} is unavailable: flexinference.cache.{cls_name} cannot be imported ({e})"
            ) from e
        return Method(name, cache_factory=functools.partial(cls, **kwargs), cache_attach=_policy_attach)

    factory.__name__ = f"{name}_factory"
    return factory


#: Method name -> factory ``(**kwargs) -> Method``. Extend with :func:`register_method`.
METHODS: dict[str, MethodFactory] = {
    "dense": _dense,
    "minference": _pattern_method("minference", _pattern("VerticalSlash")),
    "a_shape": _pattern_method("a_shape", _pattern("AShape")),
    "tri_shape": _pattern_method("tri_shape", _pattern("TriShape")),
    "block_topk": _pattern_method("block_topk", _pattern("BlockTopK")),
    "flexprefill": _pattern_method("flexprefill", _pattern("FlexPrefill")),
    "xattention": _pattern_method("xattention", _pattern("XAttention")),
    "dilated1": _pattern_method("dilated1", _pattern("Dilated", "dilated1")),
    "dilated2": _pattern_method("dilated2", _pattern("Dilated", "dilated2")),
    "streamingllm": _cache_method("streamingllm", "StreamingLLMCache"),
    "snapkv": _cache_method("snapkv", "SnapKVCache"),
    "pyramidkv": _cache_method("pyramidkv", "PyramidKVCache"),
    "kivi": _cache_method("kivi", "KIVICache"),
}


def register_method(name: str, factory: MethodFactory, *, replace: bool = False) -> None:
    """Add ``name -> factory`` to :data:`METHODS` (``replace=True`` to override an existing name)."""
    if not isinstance(name, str) or not name or "+" in name or "," in name:
        raise ValueError(f"method name must be a non-empty string without '+' or ',', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered (pass replace=True to override)")
    METHODS[name] = factory


def build_method(name: str, kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> Method:
    """The method called ``name`` (``"a+b"`` combines a prefill method with a cache method).

    Args:
        name: a registered name or a ``+`` combination.
        kwargs: per-name keyword arguments for the factories, e.g. ``{"snapkv": {"budget": 256}}``.

    Raises:
        ValueError: unknown name (the message lists the registered ones) or a bad combination.
        MethodUnavailableError: the method's implementation cannot be imported.
    """
    kwargs = kwargs or {}
    parts = [p.strip() for p in name.split("+")]
    methods = []
    for part in parts:
        if part not in METHODS:
            raise ValueError(f"unknown method {part!r}; available: {', '.join(sorted(METHODS))}")
        methods.append(METHODS[part](**dict(kwargs.get(part, {}))))
    if len(methods) == 1:
        return methods[0]
    prefills = [m for m in methods if m.prefill is not None]
    caches = [m for m in methods if m.cache_factory is not None or m.cache_attach is not None]
    if len(prefills) > 1 or len(caches) > 1:
        raise ValueError(f"method {name!r}: combine at most one prefill method and one cache method")
    prefill = prefills[0].prefill if prefills else None
    cache = caches[0] if caches else Method(name)
    return Method(name, prefill=prefill, cache_factory=cache.cache_factory, cache_attach=cache.cache_attach)
