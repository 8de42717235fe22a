"""One widget per config field, read from the field's metadata (a part of `forms`, which lays them out).

A field declared with `core.config.option` carries its type, default, limits, choices, help and group (`FieldSpec`);
`make_widget` turns that into a widget, so a limit or a default is written once, in the config:

========================================  ===========================================================================
field                                     widget
========================================  ===========================================================================
``bool``                                  CheckBox
``choices=...`` (list or function)        ComboBox (an optional field gets a first entry "auto: ...", value None)
``int``                                   SpinBox with the field's minimum/maximum (Qt's 32-bit range where open)
``float`` with a minimum and a maximum    FloatSpinBox with those limits
``float`` open on a side, ``int | None``  `NumberEdit`: a number typed as text (1e-4 reads well), limits enforced
``float | None``                          while typing; an optional one left empty means "auto"
``str`` / ``str | None``                  LineEdit (empty = None for an optional field)
========================================  ===========================================================================

For an optional field (``X | None``: "auto, the job's or the method's default") the widget says what auto means:
the placeholder and the tooltip name it, taken from the field's help ("default: ...", "omit to ..."), and None
reads back as None (`read_widget`). Qt and magicgui only: no science, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, LineEdit, SpinBox
from magicgui.widgets.bases import ValueWidget
from qtpy.QtGui import QValidator

from napari_dagman._widgets.common import path_text
from napari_dagman.core.config import field_choices
from napari_dagman.core.errors import DagmanInputError

#: Qt's spin boxes and int validators hold 32-bit integers: the range of a field without declared limits.
INT_LIMIT = 2**31 - 1
AUTO = "auto"


# --- what a field says about itself ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One config field as a form sees it: type, optional, limits, choices, help, group, default."""

    name: str
    type: Any
    optional: bool
    default: Any
    help: str
    group: str
    minimum: float | None
    maximum: float | None
    choices: tuple[Any, ...] | None

    @property
    def auto_text(self) -> str:
        """What "auto" (None) means for this field, from its help text, e.g. "auto: the preset's"."""
        return auto_meaning(self.help)


def auto_meaning(help_text: str) -> str:
    """The text "auto: <what the job uses>" from a help text's "(default: X)", "default X" or "omit to X"."""
    found = re.search(r"default:?\s+([^)]*)", help_text) or re.search(r"omit to ([^;)]*)", help_text)
    return f"{AUTO}: {found.group(1).strip().rstrip(';,.')}" if found else AUTO


def placeholder(auto_text: str) -> str:
    """The short form of an auto text for a field's placeholder (its first clause; the tooltip has it all)."""
    return auto_text.split(";")[0].strip()


def config_fields(config_class: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def default_values(config_class: type) -> dict[str, Any]:
    """The values a new config holds: its class defaults after the job's own defaults (``job_defaults``)."""
    try:
        instance = config_class()
    except Exception:  # a config with required fields: the declared defaults
        return {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(config_class)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(config_class)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for an annotation ``X | None``, else (the annotation, False)."""
    args = typing.get_args(tp)
    if type(None) not in args:
        return tp, False
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 else tp), True


@functools.cache
def _hints(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def field_spec(config_class: type, name: str, default: Any = dataclasses.MISSING) -> FieldSpec:
    """The `FieldSpec` of ``config_class.name`` (``default`` overrides the class's, e.g. a method preset's)."""
    f = config_fields(config_class)[name]
    tp, optional = _unwrap_optional(_hints(config_class)[name])
    if default is dataclasses.MISSING:
        default = default_values(config_class).get(name)
    meta = f.metadata
    return FieldSpec(
        name=name,
        type=tp,
        optional=optional,
        default=default,
        help=str(meta.get("help", "")),
        group=str(meta.get("group", "general")),
        minimum=meta.get("minimum"),
        maximum=meta.get("maximum"),
        choices=field_choices(f),
    )


# --- a number typed as text ---------------------------------------------------------------------------------------
_PARTIAL = {
    int: re.compile(r"[+-]?\d*"),
    float: re.compile(r"[+-]?(\d+\.?\d*|\.\d*)?([eE][+-]?\d*)?"),
}


def parse_number(text: str, kind: type) -> int | float | None:
    """``text`` as an int or a float; None when it is not one."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        return None
    return value if kind is int or math.isfinite(value) else None


class _NumberValidator(QValidator):
    """Lets through only what can still become a number in range (or "auto"/empty where None is allowed).

    Text that is a number out of range is "intermediate" while typing; leaving the field clamps it (`fixup`).
    """

    def __init__(self, edit: NumberEdit) -> None:
        super().__init__()
        self._edit = edit

    def validate(self, text: str, pos: int) -> tuple[QValidator.State, str, int]:
        e, t = self._edit, text.strip()
        if not t:
            return (QValidator.State.Acceptable if e.optional else QValidator.State.Intermediate), text, pos
        if e.optional and AUTO.startswith(t.lower()):
            state = QValidator.State.Acceptable if t.lower() == AUTO else QValidator.State.Intermediate
            return state, text, pos
        if not _PARTIAL[e.kind].fullmatch(t) or (
            t.startswith("-") and e.minimum is not None and e.minimum >= 0
        ):
            return QValidator.State.Invalid, text, pos
        value = parse_number(t, e.kind)
        if value is None or not e.in_range(value):
            return QValidator.State.Intermediate, text, pos
        return QValidator.State.Acceptable, text, pos

    def fixup(self, text: str) -> str:
        e = self._edit
        value = parse_number(text.strip(), e.kind)
        if value is None:
            return e.last_text
        return e.format(e.clamp(value))


class NumberEdit(LineEdit):
    """An int or float typed as text, within ``minimum``/``maximum``; empty (or "auto") = None when ``optional``.

    ``value`` is the number (None for auto). Setting a number out of range raises ValueError, like magicgui's spin
    boxes; typing one is refused or clamped. Text that is not a number (set by a script) is refused when read,
    with a `DagmanInputError` naming the widget.
    """

    def __init__(
        self,
        value: Any = None,
        *,
        kind: type = float,
        minimum: float | None = None,
        maximum: float | None = None,
        optional: bool = False,
        auto_text: str = AUTO,
        **kwargs: Any,
    ) -> None:
        self.kind, self.minimum, self.maximum, self.optional = kind, minimum, maximum, optional
        self.last_text = ""
        super().__init__(**kwargs)
        self._validator = _NumberValidator(self)
        self.native.setValidator(self._validator)
        if optional:
            self.native.setPlaceholderText(placeholder(auto_text))
        self.value = value

    def in_range(self, value: float) -> bool:
        return (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum
        )

    def clamp(self, value: float) -> float:
        if self.minimum is not None:
            value = max(value, self.kind(self.minimum))
        if self.maximum is not None:
            value = min(value, self.kind(self.maximum))
        return value

    def format(self, value: float) -> str:
        return str(int(value)) if self.kind is int else format(float(value), ".10g")

    def get_value(self) -> Any:
        text = str(super().get_value()).strip()
        if not text or (self.optional and text.lower() == AUTO):
            if self.optional:
                return None
            raise DagmanInputError(f"{self.label or self.name} must be set")
        value = parse_number(text, self.kind)
        noun = "a whole number" if self.kind is int else "a number"
        if value is None:
            either = f"'{AUTO}' or " if self.optional else ""
            raise DagmanInputError(f"{self.label or self.name} must be {either}{noun}, got {text!r}")
        if not self.in_range(value):
            raise DagmanInputError(
                f"{self.label or self.name} must be within {self.limits_text()}, got {text}"
            )
        return value

    def set_value(self, value: Any) -> None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", AUTO)):
            if not self.optional and value is None:
                raise ValueError(f"{self.label or self.name} cannot be auto (None)")
            text = ""
        elif isinstance(value, str):
            text = value.strip()  # read (and refused, if it is not a number) when the form is read
        else:
            number = self.kind(value)
            if not self.in_range(number):
                raise ValueError(f"value {value} is outside of the allowed range: {self.limits_text()}")
            text = self.format(number)
        self.last_text = text
        super().set_value(text)

    def limits_text(self) -> str:
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"[{lo}, {hi}]"

    def _on_value_change(self, value: Any = None) -> None:
        text = str(value or "").strip()
        if not text or (self.optional and text.lower() == AUTO):
            if self.optional:  # auto; an empty required field has no value to report yet
                self.last_text = text
                self.changed.emit(None)
            return
        number = parse_number(text, self.kind)
        if number is not None and self.in_range(number):
            self.last_text = text
            self.changed.emit(number)


# --- one widget per field -----------------------------------------------------------------------------------------
def _tooltip(spec: FieldSpec) -> str:
    parts = [spec.help]
    if spec.minimum is not None or spec.maximum is not None:
        lo = "" if spec.minimum is None else f"{spec.minimum:g} <= "
        hi = "" if spec.maximum is None else f" <= {spec.maximum:g}"
        parts.append(f"range: {lo}{spec.name}{hi}")
    if spec.optional:
        parts.append(f"empty / {spec.auto_text}")
    return "\n".join(p for p in parts if p)


def _decimals(*values: float | None) -> int:
    """Decimals that show every one of ``values`` (at least 2, at most 6)."""
    needed = 2
    for v in values:
        if v:
            text = format(abs(float(v)), ".6f").rstrip("0")
            needed = max(needed, len(text.split(".")[1]) if "." in text else 0)
    return min(needed, 6)


def make_widget(
    spec: FieldSpec,
    *,
    label: str | None = None,
    step: float | None = None,
    choice_text: Mapping[Any, str] | Callable[[Any], str] | None = None,
) -> ValueWidget:
    """The widget of one field, set to its default; tooltip = help, range and what auto means."""
    label = label or spec.name.replace("_", " ")
    common: dict[str, Any] = {"label": label, "name": spec.name, "tooltip": _tooltip(spec)}
    default = spec.default
    choice_values = spec.choices
    if choice_values is None and spec.type is bool and spec.optional:
        choice_values = (True, False)
    if choice_values is not None:

        def text(value: Any) -> str:
            if callable(choice_text):
                return choice_text(value)
            return (choice_text or {}).get(value, str(value))

        choices: list[tuple[str, Any]] = [(text(c), c) for c in choice_values]
        if spec.optional:
            choices.insert(0, (spec.auto_text, None))
        return ComboBox(choices=choices, value=default, **common)
    if spec.type is bool:
        return CheckBox(value=bool(default), **common)
    if spec.type in (int, float):
        bounded = spec.minimum is not None and spec.maximum is not None
        if spec.type is int and not spec.optional:
            lo = -INT_LIMIT if spec.minimum is None else int(spec.minimum)
            hi = INT_LIMIT if spec.maximum is None else int(spec.maximum)
            return SpinBox(value=default, min=lo, max=hi, step=step or 1, **common)
        if spec.type is float and bounded and not spec.optional:
            box = FloatSpinBox(min=spec.minimum, max=spec.maximum, step=step, **common)
            box.native.setDecimals(_decimals(default, spec.minimum, spec.maximum, step))
            box.value = default
            return box
        return NumberEdit(
            default,
            kind=spec.type,
            minimum=spec.minimum,
            maximum=spec.maximum,
            optional=spec.optional,
            auto_text=spec.auto_text,
            **common,
        )
    if spec.type is str:
        edit = LineEdit(value="" if default is None else str(default), **common)
        if spec.optional:
            edit.native.setPlaceholderText(placeholder(spec.auto_text))
        return edit
    raise TypeError(f"no form widget for field '{spec.name}' of type {spec.type!r}; give one in `widgets`")


def read_widget(widget: Any, optional: bool = True) -> Any:
    """A widget's value as a config takes it: paths as text, an empty optional text as None."""
    if isinstance(widget, FileEdit):
        value: Any = path_text(widget)
    else:
        value = widget.value
    if isinstance(value, Path):
        value = str(value)
    if optional and isinstance(value, str) and not value.strip():
        return None
    return value


def widget_limits(widget: Any) -> tuple[float | None, float | None]:
    """(minimum, maximum) a widget lets through; None where it is open (Qt's int range counts as open)."""
    if isinstance(widget, NumberEdit):
        return widget.minimum, widget.maximum
    lo, hi = getattr(widget, "min", None), getattr(widget, "max", None)
    lo = None if lo is not None and lo <= -INT_LIMIT else lo
    hi = None if hi is not None and hi >= INT_LIMIT else hi
    return lo, hi
