"""Forms built from config dataclasses: defaults and limits come from the field metadata, values round-trip."""

from __future__ import annotations

import dataclasses

import pytest

from napari_dagman._widgets.common.forms import (
    ConfigForm,
    NumberEdit,
    auto_meaning,
    default_values,
    widget_limits,
)
from napari_dagman.core.config import FinetuneConfig, field_choices
from napari_dagman.core.errors import DagmanInputError
from napari_dagman.core.methods.dagman import CoDistillationOptions
from napari_dagman.core.methods.registry import get_method


def metadata_limits(config_class, name):
    meta = {f.name: f.metadata for f in dataclasses.fields(config_class)}[name]
    return meta.get("minimum"), meta.get("maximum")


@pytest.fixture(params=[FinetuneConfig, CoDistillationOptions], ids=lambda c: c.__name__)
def form(request, qtbot):
    return ConfigForm(request.param)


def test_defaults_are_the_dataclass_defaults(form):
    expected = default_values(form.config_class)
    assert form.fields  # every field with a widget
    for name in form.fields:
        assert form.value(name) == expected[name], name
    # the job's own defaults apply (fine-tuning: lr 1e-4), and "auto" fields read back as None
    if form.config_class is FinetuneConfig:
        assert form.value("lr") == pytest.approx(1e-4) and form.value("roi") is None
    assert form.changed_values() == {}


def test_limits_and_choices_are_the_field_metadata(form):
    for f in dataclasses.fields(form.config_class):
        if f.name not in form:
            continue
        widget = form[f.name]
        lo, hi = metadata_limits(form.config_class, f.name)
        if lo is not None or hi is not None:
            assert widget_limits(widget) == (lo, hi), f.name
        choices = field_choices(f)
        if choices is not None:
            offered = [c for c in widget.choices if c is not None]  # None = "auto" of an optional field
            assert offered == list(choices), f.name
        assert f.metadata["help"] in widget.tooltip


def test_values_round_trip_into_the_config(qtbot):
    form = ConfigForm(FinetuneConfig)
    form.set_values(
        {"roi": 128, "spacing": 1.5, "lr": 3e-4, "val_split": "slab", "preset": "tiny", "augment": False}
    )
    config = FinetuneConfig.from_dict(form.values())
    assert (config.roi, config.spacing, config.lr, config.val_split, config.preset, config.augment) == (
        128,
        1.5,
        3e-4,
        "slab",
        "tiny",
        False,
    )
    assert form.changed_values() == {
        "roi": 128,
        "spacing": 1.5,
        "lr": 3e-4,
        "val_split": "slab",
        "preset": "tiny",
        "augment": False,
    }
    # None (auto) round-trips, through the widgets and through the config
    form.set_values({"roi": None, "preset": None, "hu_min": None})
    again = FinetuneConfig.from_dict(form.values())
    assert (again.roi, again.preset, again.hu_min) == (None, None, None)
    other = ConfigForm(FinetuneConfig)
    other.set_values({k: v for k, v in config.to_dict().items() if k in other})
    assert other.values() == form.values() | {"roi": 128, "preset": "tiny", "hu_min": None}
    # keys that are not fields of the form come back
    assert form.set_values({"images": [], "roi": 64}) == ["images"]


def test_an_out_of_range_value_cannot_be_entered(qtbot):
    form = ConfigForm(FinetuneConfig)
    fraction = form["val_fraction"]  # a bounded float: a spin box
    lo, hi = metadata_limits(FinetuneConfig, "val_fraction")
    with pytest.raises(ValueError):
        fraction.value = hi + 0.1
    fraction.native.setValue(hi + 0.1)  # what typing does: clamped by the widget
    assert fraction.value == pytest.approx(hi)
    fraction.native.setValue(lo - 0.5)
    assert fraction.value == pytest.approx(lo)

    roi = form["roi"]  # an optional int with a minimum: typed as text
    assert isinstance(roi, NumberEdit) and roi.optional
    with pytest.raises(ValueError):
        roi.value = 32
    roi.native.clear()
    qtbot.keyClicks(roi.native, "-96")  # the minus sign is refused while typing
    assert roi.native.text() == "96" and roi.value == 96
    roi.native.setText("32")  # below the minimum: clamped when the field is left
    roi.native.setText(roi._validator.fixup(roi.native.text()))
    assert roi.value == 64
    qtbot.keyClicks(roi.native, "x")  # not a number
    assert roi.native.text() == "64"

    lr = form["lr"]
    lr.value = "fast"  # a script may set any text: reading it says what is wrong, in one line
    with pytest.raises(DagmanInputError, match="lr must be 'auto' or a number"):
        form.values()


def test_auto_fields_say_what_auto_means(qtbot):
    form = ConfigForm(FinetuneConfig)
    assert form["roi"].native.placeholderText() == "auto: the run's ROI, at least 64"
    assert "auto: the run's ROI, at least 64; else 96" in form["roi"].tooltip
    assert form["preset"].native.itemText(0).startswith("auto: small")
    assert auto_meaning("threads (default: torch's choice)") == "auto: torch's choice"
    assert auto_meaning("spacing; omit to keep the file's") == "auto: keep the file's"
    assert auto_meaning("passes over the volumes (batch-size volumes per step)") == "auto"


def test_method_options_form_shows_the_preset(qtbot):
    spec = get_method("attmask")
    form = ConfigForm(spec.options_class(), defaults=spec.default_options())
    assert form.value("mask_ratio") == pytest.approx(spec.defaults["mask_ratio"])
    assert form.value("teacher_noise") == spec.defaults["teacher_noise"]
    assert form.changed_values() == {}
    form["mask_ratio"].value = 0.5
    assert spec.make_options(form.changed_values()).mask_ratio == 0.5
    assert spec.make_options(form.values()).masking_prob == spec.defaults["masking_prob"]


def test_sections_follow_the_groups(qtbot):
    form = ConfigForm(CoDistillationOptions)
    sections = form.sections(primary={"mask_ratio", "teacher_noise"}, expanded=("masking",))
    titles = [title for title, *_ in sections]
    assert titles == ["Masking", "Teacher", "Views", "Loss"]
    masking = sections[0]
    assert [w.name for w in masking[1]] == ["mask_ratio"] and masking[3] is True
    assert "mask_strategy" in [w.name for w in masking[2]]
    merged = form.sections({"teacher": "Teacher and loss", "loss": "Teacher and loss"})
    assert [title for title, *_ in merged] == ["Teacher and loss", "Masking", "Views"]
    holder = form.widget(primary={"mask_ratio"})
    assert holder is not None and len(form.containers) == 5  # masking shown + its "more", teacher, views, loss
