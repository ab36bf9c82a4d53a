"""Invalid settings in one line (more_lightning.errors): jsonargparse's nested messages and __init__ checks."""

from __future__ import annotations

import pytest

from more_lightning.errors import SettingError, plain_parse_error, setting_error

#: jsonargparse 4.x's message for ``--model.init_args.editor.init_args.r abc`` (from a real run).
NESTED = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'more_lightning.module.OnlineEditModule':
        Parser key "editor":
          Problem with given class_path 'more_lightning.editors.more.MORE':
            Parser key "r":
              Expected a <class 'int'>. Got value: abc
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='editor.init_args.r', val='abc')"""

#: ... and for ``--trainer.max_epochs x``.
FLAT = """Parser key "trainer.max_epochs":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'int'>, <class 'NoneType'>]
  Errors:
    - Expected a <class 'int'>
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: x"""


def test_parse_errors_name_the_dotted_setting():
    assert plain_parse_error(NESTED) == "model.init_args.editor.init_args.r: expected int, got abc"
    assert plain_parse_error(FLAT) == "trainer.max_epochs: expected int, got x"
    assert plain_parse_error("Unrecognized arguments:\n  --foo 1") == "Unrecognized arguments: --foo 1"


class Inner:
    def __init__(self, width: int = 1, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")


class Outer:
    def __init__(self, inner: Inner, size: int = 1) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if inner is None:
            raise ValueError("width=9 does not fit")  # names an argument of the class configured inside


CONFIG = {
    "model": {
        "class_path": f"{__name__}.Outer",
        "init_args": {"inner": {"class_path": f"{__name__}.Inner", "init_args": {"depth": 0}}},
    }
}


def _raised(fn) -> BaseException:
    try:
        fn()
    except ValueError as exc:
        wrapped = ValueError("Does not validate against any of the Union subtypes ...")
        wrapped.__cause__ = exc
        return wrapped
    raise AssertionError("no error")


def test_an_init_check_becomes_a_setting_error_with_its_key():
    error = setting_error(_raised(lambda: Inner(depth=0)), CONFIG)
    assert isinstance(error, SettingError)
    assert str(error) == "depth must be >= 1, got 0 (setting: model.init_args.inner.init_args.depth)"
    assert str(setting_error(_raised(lambda: Outer(Inner(), size=-1)), CONFIG)).endswith("model.init_args.size)")
    nested = setting_error(_raised(lambda: Outer(None)), CONFIG)
    assert str(nested) == "width=9 does not fit (setting: model.init_args.inner.init_args.width)"


def test_errors_outside_configured_classes_stay_what_they_are():
    def bug():
        raise ValueError("a bug, not a setting")

    assert setting_error(_raised(bug), CONFIG) is None
    with pytest.raises(TypeError):
        Inner(1, 2, 3)
    assert setting_error(TypeError("x"), CONFIG) is None
