"""Settings a user gave that cannot be used, and how the command line words them.

A class built from a config checks its arguments in ``__init__`` and raises ``ValueError`` naming the
argument (``r must be >= 1, got 0``); LightningCLI builds those classes through jsonargparse, which buries
that message under the config's class tree. :func:`setting_error` digs it out and names the setting as a
dotted config key (``model.init_args.editor.init_args.r``); :func:`plain_parse_error` does the same for
jsonargparse's own parse errors (a value of the wrong type, an unknown key).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any


class SettingError(ValueError):
    """A setting cannot be used as given; the message names the setting and says what it accepts."""


def innermost(exc: BaseException) -> BaseException:
    """The exception at the bottom of ``exc``'s ``raise ... from`` chain."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _class_paths(config: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(class path, dotted key) of every ``class_path`` block in a config as nested dicts."""
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key == "class_path" and isinstance(value, str):
            yield value, prefix
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _class_paths(item, f"{path}.{i}")
        elif isinstance(value, dict):
            yield from _class_paths(value, path)


def _constructing(exc: BaseException) -> list[type]:
    """Classes whose ``__init__`` was running where ``exc`` was raised, outermost first."""
    classes, tb = [], exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            if cls not in classes:
                classes.append(cls)
        tb = tb.tb_next
    return classes


def _argument_named(cls: type, message: str) -> str | None:
    """The ``__init__`` argument of ``cls`` that ``message`` names first (as a whole word), if any."""
    try:
        names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return None
    found = [(m.start(), n) for n in names if (m := re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w-])", message))]
    return min(found)[1] if found else None


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def setting_error(exc: BaseException, config: Any) -> SettingError | None:
    """The invalid setting behind ``exc``, raised while building the classes of ``config``, as one message.

    ``exc`` counts when the bottom of its chain is a ``ValueError`` raised inside the ``__init__`` of a class
    the config names. The message is that error's, followed by the setting's dotted key when the message
    names an argument of that class or of a class configured inside it (a backbone checked by the module that
    loads it), else by the config block and class.
    """
    cause = innermost(exc)
    if not isinstance(cause, ValueError):
        return None
    blocks = list(_class_paths(config.as_dict() if hasattr(config, "as_dict") else config))
    keys = {}
    for class_path, key in blocks:
        keys.setdefault(class_path, key)
    for cls in reversed(_constructing(cause)):
        key = keys.get(f"{cls.__module__}.{cls.__qualname__}")
        if key is None:
            continue
        nested = [(path, k) for path, k in blocks if k.startswith(f"{key}.")]
        for inner, inner_key in [(cls, key), *((_import(path), k) for path, k in nested)]:
            argument = _argument_named(inner, str(cause)) if inner is not None else None
            if argument:
                return SettingError(f"{cause} (setting: {inner_key}.init_args.{argument})")
        return SettingError(f"{cause} (while building {key}: {cls.__qualname__})")
    return None


#: Lines of a jsonargparse error that only describe its structure.
_STRUCTURE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:")


def plain_parse_error(message: str) -> str:
    """jsonargparse's nested parse error as one line: the dotted key that failed and why.

    ``Parser key "model": ... Problem with given class_path '...MORE': Parser key "r": Expected a <class 'int'>.
    Got value: abc`` becomes ``model.init_args.editor.init_args.r: expected int, got abc``. A message without that
    structure is returned on one line as it is.
    """
    stack: list[tuple[int, str]] = []
    best: tuple[int, list[str], list[str]] = (-1, [], [])
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if not text:
            continue
        indent = len(line) - len(line.lstrip(" -"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = re.match(r'Parser key "([^"]+)":?$', text)
        if key:
            stack.append((indent, key.group(1)))
        elif text.startswith("Problem with given class_path"):
            stack.append((indent, "init_args"))
        elif not text.startswith(_STRUCTURE) and "NoneType" not in text and not text.startswith("Given value: Nested"):
            depth, path = len(stack), [part for _, part in stack]
            if depth > best[0]:
                best = (depth, path, [text])
            elif depth == best[0] and path == best[1]:
                best[2].append(text)
    depth, path, reasons = best
    if depth < 1:
        return " ".join(message.split())
    reason = "; ".join(reasons)
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason).replace("Expected a ", "expected ")
    reason = reason.replace(". Got value: ", ", got ").replace("; Given value: ", ", got ")
    return f"{'.'.join(path)}: {reason}"
