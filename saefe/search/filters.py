"""Filters on any metadata column: ``--where subreddit=pics --where 'width>=512' --where 'path=memes/*'``.

A condition is ``COLUMN OP VALUE`` with OP one of ``= != >= <= > <``. ``=`` / ``!=`` take
alternatives separated by ``|`` (``subreddit=pics|aww``) and shell-style globs (``*``, ``?``,
``[...]``) for text. Ranges compare numbers on numeric columns, times on datetime columns and
text (e.g. ISO dates) otherwise. Several conditions must all hold. A filter evaluates to one
boolean mask over the store's rows (vectorised pandas, cached per store and filter), which the
search uses as a FAISS ID selector, an exact scan over the selected rows, or a mask on the
feature-posting merge (saefe.search.query).
"""

from __future__ import annotations

import fnmatch
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from saefe.errors import SaefeError

OPS = (">=", "<=", "!=", "=", ">", "<")
_COND = re.compile(r"^\s*([^<>=!]+?)\s*(>=|<=|!=|==|=|>|<)\s*(.*?)\s*$")
GLOB_CHARS = set("*?[")


class FilterError(SaefeError):
    """A --where condition that cannot be parsed or applied."""


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    value: str

    @classmethod
    def parse(cls, spec: str) -> "Condition":
        m = _COND.match(str(spec))
        if not m or not m.group(3):
            raise FilterError(f"bad filter {spec!r}: expected COLUMN OP VALUE with OP one of {' '.join(OPS)}, "
                              "e.g. subreddit=pics, 'width>=512', 'path=memes/*'")
        op = "=" if m.group(2) == "==" else m.group(2)
        return cls(m.group(1).strip(), op, m.group(3))

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value}"

    def mask(self, df: pd.DataFrame) -> np.ndarray:
        if self.column not in df.columns:
            cols = ", ".join(c for c in df.columns if not str(c).startswith("_"))
            raise FilterError(f"no metadata column {self.column!r} to filter on; columns: {cols}")
        col = df[self.column]
        if self.op in ("=", "!="):
            hit = np.zeros(len(col), bool)
            for alt in self.value.split("|"):
                hit |= _equal(col, alt)
            return hit if self.op == "=" else ~hit
        return _compare(col, self.op, self.value, str(self))


def _equal(col: pd.Series, value: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(col):
        return (col == (value.lower() in ("1", "true", "yes"))).to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(col):
        try:
            return (col == float(value)).to_numpy(dtype=bool)
        except ValueError:
            raise FilterError(f"column {col.name!r} holds numbers; {value!r} is not one") from None
    text = col.astype("string")
    if GLOB_CHARS & set(value):
        rx = fnmatch.translate(value)
        return text.str.match(rx).fillna(False).to_numpy(dtype=bool)
    return (text == value).fillna(False).to_numpy(dtype=bool)


def _compare(col: pd.Series, op: str, value: str, spec: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        try:
            v: Any = float(value)
        except ValueError:
            raise FilterError(f"{spec}: column {col.name!r} holds numbers; {value!r} is not one") from None
        s: pd.Series = col
    elif pd.api.types.is_datetime64_any_dtype(col):
        try:
            v = pd.Timestamp(value)
            if col.dt.tz is not None and v.tzinfo is None:
                v = v.tz_localize(col.dt.tz)
        except (ValueError, TypeError):
            raise FilterError(f"{spec}: {value!r} is not a date/time") from None
        s = col
    else:
        s, v = col.astype("string"), value
    res = {">=": s >= v, "<=": s <= v, ">": s > v, "<": s < v}[op]
    return pd.Series(res).fillna(False).to_numpy(dtype=bool)


class Filter:
    """All conditions AND-ed. ``Filter.parse(["a=b", "w>=5"])``; an empty filter selects everything."""

    def __init__(self, conditions: Sequence[Condition] = ()):
        self.conditions = tuple(conditions)

    @classmethod
    def parse(cls, specs: Iterable[str] | str | dict | None) -> "Filter":
        """From --where strings, one string with conditions separated by ';' or newlines, or a JSON
        object {column: value | [alternatives] | {">=": x, "<": y}} (the HTTP API)."""
        if specs is None:
            return cls()
        if isinstance(specs, dict):
            conds = []
            for col, v in specs.items():
                if isinstance(v, dict):
                    for op, x in v.items():
                        conds.append(Condition.parse(f"{col}{op}{x}"))
                elif isinstance(v, (list, tuple)):
                    conds.append(Condition(str(col), "=", "|".join(str(x) for x in v)))
                else:
                    conds.append(Condition(str(col), "=", str(v)))
            return cls(conds)
        if isinstance(specs, str):
            specs = [s for s in re.split(r"[;\n]", specs)]
        return cls([Condition.parse(s) for s in specs if str(s).strip()])

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def __str__(self) -> str:
        return " AND ".join(str(c) for c in self.conditions)

    @property
    def key(self) -> tuple:
        return tuple(sorted((c.column, c.op, c.value) for c in self.conditions))

    def mask(self, df: pd.DataFrame) -> np.ndarray:
        m = np.ones(len(df), bool)
        for c in self.conditions:
            m &= c.mask(df)
        return m


_cache: "dict[int, tuple[weakref.ref, OrderedDict[tuple, np.ndarray]]]" = {}
_cache_lock = threading.Lock()
CACHE_SIZE = 16  # masks kept per metadata table


def cached_mask(flt: Filter, df: pd.DataFrame) -> np.ndarray:
    """The filter's row mask over ``df``; the last few per table are cached (a paged or repeated
    search does not re-evaluate a glob over a million paths). Dropped with the table."""
    with _cache_lock:
        ent = _cache.get(id(df))
        if ent is None or ent[0]() is not df:
            ent = (weakref.ref(df), OrderedDict())
            _cache[id(df)] = ent
            weakref.finalize(df, _cache.pop, id(df), None)
        per = ent[1]
        hit = per.get(flt.key)
        if hit is not None:
            per.move_to_end(flt.key)
            return hit
    m = flt.mask(df)
    m.setflags(write=False)
    with _cache_lock:
        per[flt.key] = m
        while len(per) > CACHE_SIZE:
            per.popitem(last=False)
    return m
