"""``napari-dagman view``: open napari with the plugin's docks and the sample CT (or the given files)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_parser(sub: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    p = sub.add_parser(
        "view",
        help="open napari with the plugin and the sample CT (or your files)",
        description="Open napari with napari-dagman's docks; with no file, the synthetic CT phantom and its "
        "organ labels are loaded.",
    )
    p.add_argument(
        "files", nargs="*", help="CT or label files / DICOM folders to open (default: the sample phantom)"
    )
    p.add_argument("--no-docks", action="store_true", help="do not open the plugin's docks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_files(args.files)  # before the window opens: a wrong path is one line, not a traceback from napari
    import napari

    viewer = napari.Viewer(title="napari-dagman")
    if args.files:
        for path in args.files:
            viewer.open(path, plugin="napari-dagman")
    else:
        viewer.open_sample("napari-dagman", "phantom")
    if not args.no_docks:
        open_docks(viewer)
    napari.run()
    return 0


def check_files(files: Sequence[str]) -> None:
    """Refuse a path that does not exist or that the plugin's reader does not take (neither a volume file nor a
    folder with DICOM)."""
    from pathlib import Path

    from napari_dagman._reader import get_reader
    from napari_dagman.core.errors import DagmanInputError

    for name in files:
        path = Path(name)
        if not path.exists():
            raise DagmanInputError(f"{path} does not exist")
        if get_reader(str(path)) is None:
            what = "a folder without DICOM files" if path.is_dir() else "not a CT or label file this plugin reads"
            raise DagmanInputError(f"{path} is {what} (NIfTI, NRRD, MHA/MHD, DICOM)")


def open_docks(viewer) -> list[str]:
    """Dock every napari-dagman widget of the manifest, tabbed on the right; returns their names."""
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest("napari-dagman")
    opened = []
    for widget in manifest.contributions.widgets or []:
        viewer.window.add_plugin_dock_widget("napari-dagman", widget.display_name, tabify=bool(opened))
        opened.append(widget.display_name)
    return opened
