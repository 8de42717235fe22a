"""The one-command demo: every stage writes its figure and numbers, and the report opens in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from napari_dagman.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    # the phantom, the quick budget cut further for a test: the stages and their files are what is checked
    assert main(["demo", "--quick", "--steps", "4", "--finetune-steps", "2", "--out", str(out), "--quiet"]) == 0
    return out


def test_every_stage_writes_its_figures_and_numbers(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["stages_done"] == ["pretraining", "attention", "fine-tuning", "organ clusters"]
    for name in ("curves.png", "attention_heads.png", "attention/mask_previews.png", "segmentation.png", "clusters.png"):
        assert (demo / name).is_file() and (demo / name).stat().st_size > 5000, name
    assert summary["pretraining"]["steps"] == 4 and summary["pretraining"]["probe_head_diversity"]
    assert 0.0 <= summary["attention"]["head_diversity"] <= 1.0
    assert "liver" in summary["fine-tuning"]["whole_volume_dice"]
    assert summary["organ clusters"]["patches"] > 10 and summary["organ clusters"]["metrics"]["nmi"] >= 0
    assert set(summary["timings"]) >= {"data", "pretraining", "attention", "fine-tuning", "organ clusters", "total"}
    assert summary["environment"]["torch"] and summary["device"] == "cpu"


def test_the_report_opens_in_a_headless_browser_with_every_image(demo, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (.ci/run installs it)")
    page = (demo / "index.html").resolve()
    n_images = page.read_text().count("<img ")
    assert n_images >= 5
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'data-images="(\d+)/(\d+)"', result.stdout)
    assert found, result.stderr[-2000:]
    loaded, total = int(found.group(1)), int(found.group(2))
    assert total == n_images and loaded == total  # every figure decoded: none missing, none broken
