"""Forms built from the job configs: one magicgui widget per field, read from the field's metadata.

A field declared with `core.config.option` carries its type, default, limits, choices, help and group; `fields`
turns that into a widget (its table says which widget each kind of field gets), so a limit or a default is
written once, in the config. For an optional field (``X | None``) the widget says what auto means, and None reads
back as None. `ConfigForm` holds the widgets of chosen fields of one config class, reads them back
(`ConfigForm.values`: every field of the form; `ConfigForm.changed_values`: the ones that differ from the form's
defaults), fills them (`ConfigForm.set_values`) and lays them out in collapsible sections by the fields' ``group``
(`add_sections`, with the layout helpers the docks share). The names of `fields` are re-exported here.
Qt and magicgui only: no science, no torch.
"""
from __future__ import annotations

import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from magicgui.widgets import Container, FileEdit, Label, LineEdit
from qtpy.QtWidgets import QBoxLayout, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dagman._widgets.common.fields import (
    AUTO,
    INT_LIMIT,
    FieldSpec,
    NumberEdit,
    _hints,
    _tooltip,
    _unwrap_optional,
    auto_meaning,
    config_fields,
    default_values,
    field_spec,
    make_widget,
    parse_number,
    placeholder,
    read_widget,
    widget_limits,
)
from napari_dagman.core.errors import DagmanInputError

__all__ = [
    "AUTO", "INT_LIMIT", "ConfigForm", "FieldSpec", "NumberEdit", "Section", "add_sections", "auto_meaning",
    "compact_form", "config_fields", "default_values", "field_spec", "make_widget", "parse_number", "placeholder",
    "read_widget", "widget_limits", "with_widgets", "wrapped_label",
]  # fmt: skip


# --- a form of several fields ---------------------------------------------------------------------------------------
#: (title, widgets shown, widgets folded under "more", expanded) of a collapsible form section.
Section = tuple[str, list[Any], list[Any], bool]


class ConfigForm:
    """Widgets for chosen fields of a config dataclass (a `ConfigBase` or a method's options), by field name.

    Parameters
    ----------
    config_class
        The dataclass whose field metadata builds the widgets.
    fields
        The fields to show, in this order (default: every field whose type has a widget, in declaration order).
    defaults
        Values that replace the class defaults (a method preset's `default_options()`, a run's config).
    widgets
        Ready-made widgets for some fields (a device list, a folder picker); they get the field's tooltip when they
        have none, and take part in `values` and `set_values` like the others.
    labels, steps, choice_text
        Per-field label, spin-box step and text of each choice value (how a value is *shown*, not its limits).
    """

    def __init__(
        self,
        config_class: type,
        fields: Iterable[str] | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
        widgets: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        steps: Mapping[str, float] | None = None,
        choice_text: Mapping[str, Mapping[Any, str] | Callable[[Any], str]] | None = None,
    ) -> None:
        self.config_class = config_class
        known = config_fields(config_class)
        base = default_values(config_class)
        given = dict(defaults or {})
        unknown = sorted((set(given) | set(fields or ())) - set(known))
        if unknown:
            raise KeyError(f"{config_class.__name__} has no field(s) {', '.join(unknown)}")
        names = (
            list(fields) if fields is not None else [n for n in known if self._has_widget(config_class, n)]
        )
        self.specs: dict[str, FieldSpec] = {
            n: field_spec(config_class, n, given.get(n, base.get(n))) for n in names
        }
        self.widgets: dict[str, Any] = {}
        for name, spec in self.specs.items():
            ready = (widgets or {}).get(name)
            if ready is not None:
                if not getattr(ready, "tooltip", None):
                    ready.tooltip = _tooltip(spec)
                self.widgets[name] = ready
                continue
            self.widgets[name] = make_widget(
                spec,
                label=(labels or {}).get(name),
                step=(steps or {}).get(name),
                choice_text=(choice_text or {}).get(name),
            )

    @staticmethod
    def _has_widget(config_class: type, name: str) -> bool:
        tp, _ = _unwrap_optional(_hints(config_class)[name])
        return config_fields(config_class)[name].metadata.get("choices") is not None or tp in (
            bool,
            int,
            float,
            str,
        )

    # --- access -----------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.widgets[name]

    def __contains__(self, name: object) -> bool:
        return name in self.widgets

    def __iter__(self) -> typing.Iterator[str]:
        return iter(self.widgets)

    @property
    def fields(self) -> list[str]:
        return list(self.widgets)

    @property
    def defaults(self) -> dict[str, Any]:
        """The value each field started from (None = auto)."""
        return {name: spec.default for name, spec in self.specs.items()}

    def groups(self) -> dict[str, list[str]]:
        """Group name -> field names of the form, in form order."""
        out: dict[str, list[str]] = {}
        for name, spec in self.specs.items():
            out.setdefault(spec.group, []).append(name)
        return out

    # --- values -----------------------------------------------------------------------------------------------
    def value(self, name: str) -> Any:
        """One field's value as the config takes it (raises `DagmanInputError` for text that is not valid)."""
        return read_widget(self.widgets[name], self.specs[name].optional)

    def values(self) -> dict[str, Any]:
        """Every field of the form -> its value (None = auto), ready for the config's ``from_dict``."""
        return {name: self.value(name) for name in self.widgets}

    def changed_values(self) -> dict[str, Any]:
        """Only the fields whose value differs from the form's defaults (what the user set)."""
        defaults = self.defaults
        return {name: value for name, value in self.values().items() if value != defaults[name]}

    def set_values(self, data: Mapping[str, Any]) -> list[str]:
        """Fill the fields named in ``data`` (others stay); returns the keys that are not fields of this form.

        A value a widget refuses (out of range, not a choice) raises `DagmanInputError` naming the field.
        """
        rest = []
        for key, value in data.items():
            widget = self.widgets.get(key)
            if widget is None:
                rest.append(key)
                continue
            try:
                text_field = isinstance(widget, LineEdit | FileEdit) and not isinstance(widget, NumberEdit)
                widget.value = "" if value is None and text_field else value
            except (ValueError, TypeError) as err:
                raise DagmanInputError(f"{key}: {err}") from None
        return rest

    def reset(self) -> None:
        """Every field back to the form's defaults."""
        self.set_values(self.defaults)

    # --- layout -----------------------------------------------------------------------------------------------
    def sections(
        self,
        titles: Mapping[str, str] | None = None,
        *,
        primary: Collection[str] | None = None,
        expanded: Collection[str] | bool = True,
    ) -> list[Section]:
        """One section per group (in form order): ``primary`` fields shown, the others folded under "more".

        ``titles`` names the sections of groups (groups given the same title share a section) and orders them
        first, in its order; ``primary`` None shows every field; ``expanded`` names the groups whose section is
        open at first (or True / False for all).
        """
        titles = dict(titles or {})
        groups = self.groups()
        order = [g for g in titles if g in groups] + [g for g in groups if g not in titles]
        merged: dict[str, tuple[list[Any], list[Any], bool]] = {}
        for group in order:
            shown, folded, is_open = merged.setdefault(titles.get(group, group.capitalize()), ([], [], False))
            for name in groups[group]:
                (shown if primary is None or name in primary else folded).append(self.widgets[name])
            opened = expanded if isinstance(expanded, bool) else group in expanded
            merged[titles.get(group, group.capitalize())] = (shown, folded, is_open or opened)
        return [(title, shown, folded, is_open) for title, (shown, folded, is_open) in merged.items()]

    def widget(self, **section_options: Any) -> QWidget:
        """A standalone widget: a collapsible section per group (see `sections` for the options)."""
        holder = QWidget()
        layout = QVBoxLayout(holder)
        layout.setContentsMargins(0, 0, 0, 0)
        self.containers = add_sections(layout, self.sections(**section_options), holder)
        return holder


# --- layout helpers the docks share ---------------------------------------------------------------------------------
def compact_form(widgets: list[Any]) -> Container:
    """A labelled magicgui form without margins (it sits in a dock's own layout)."""
    form = Container(widgets=widgets, labels=True)
    form.margins = (0, 0, 0, 0)
    return form


def wrapped_label(text: str = "") -> Label:
    """A magicgui Label whose text wraps (summaries, hints)."""
    label = Label(value=text)
    label.native.setWordWrap(True)
    return label


def with_widgets(
    sections: Iterable[Section],
    before: Mapping[str, list[Any]] | None = None,
    after: Mapping[str, list[Any]] | None = None,
) -> list[Section]:
    """``sections`` with a dock's own widgets put before / after the shown widgets of the section of that title
    (a section that only the dock fills is added at the end)."""
    before, after = dict(before or {}), dict(after or {})
    out: list[Section] = []
    for title, shown, folded, expanded in sections:
        out.append((title, before.pop(title, []) + shown + after.pop(title, []), folded, expanded))
    for title in dict.fromkeys([*before, *after]):
        out.append((title, before.get(title, []) + after.get(title, []), [], True))
    return out


def add_sections(
    layout: QBoxLayout, sections: Iterable[Section], parent: QWidget | None = None
) -> list[Container]:
    """A collapsible box per section with its shown widgets and, folded inside it, "more ..." with the rest.

    Returns the forms made (a dock disables them while its job runs). Sections without widgets are left out.
    """
    forms: list[Container] = []
    for title, shown, folded, expanded in sections:
        if not shown and not folded:
            continue
        box = QCollapsible(title, parent)
        if shown:
            form = compact_form(shown)
            box.addWidget(form.native)
            forms.append(form)
        if folded:
            more = QCollapsible(f"more {title.lower()} options", parent)
            form = compact_form(folded)
            more.addWidget(form.native)
            forms.append(form)
            box.addWidget(more)
        if expanded:
            box.expand(animate=False)
        layout.addWidget(box)
    return forms
