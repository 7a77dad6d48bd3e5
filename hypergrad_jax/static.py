"""Option values (estimators, solvers, methods, runs) as static ``jit`` arguments.

Every option in the library is a NamedTuple, and tuples compare by value alone:
``CG(20, 0.5, 0.0) == Neumann(20, 0.5, 0.0)`` is ``True`` for plain tuples. A ``jit``
cache keyed on such values would hand one type's compiled program to the other, silently.
:func:`typed_key` is a value with its type at every level of nesting; :func:`typed` makes
an option class compare and hash by it, so a user's own ``jax.jit(...,
static_argnums=...)`` over our values is safe too, and :class:`Static` is the key of the
library's internal ``jit``.
"""

from __future__ import annotations

from typing import Any


def typed_key(x: Any) -> Any:
    """``x`` with its type recorded at every level: ``(type, fields...)`` for tuples and
    lists (NamedTuples included), ``(type, x)`` for anything else. Two values have equal
    keys only when they have the same types everywhere and equal leaves."""
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(typed_key(v) for v in x))
    return (type(x), x)


def typed(cls):
    """Class decorator for NamedTuple options: equality and hash by :func:`typed_key`, so
    values of different option types never compare equal, whatever their fields."""
    cls.__eq__ = lambda self, other: typed_key(self) == typed_key(other)
    cls.__ne__ = lambda self, other: typed_key(self) != typed_key(other)
    cls.__hash__ = lambda self: hash(typed_key(self))
    return cls


class Static:
    """A static ``jit`` argument, hashed by :func:`typed_key` when it is hashable (so
    ``hg.Implicit()`` built afresh each call hits the cache, and a ``Neumann`` never hits a
    ``CG``'s program) and by identity otherwise (e.g. an option given as an array)."""

    def __init__(self, value):
        self.value = value
        self._key = typed_key(value)
        try:
            self._hash = hash(self._key)
            self._by_value = True
        except TypeError:
            self._hash, self._by_value = id(value), False

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if not isinstance(other, Static):
            return False
        if self._by_value and other._by_value:
            return self._key == other._key
        return self.value is other.value
