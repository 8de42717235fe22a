#!/usr/bin/env bash
# Set up the project (first time: a virtual environment in .venv, CPU torch unless one is already there,
# the package in editable mode with its test extras), then run napari or the test suite.
#
#   bash scripts/dev.sh run [FILES...]   open napari with the plugin's docks and the sample CT (or FILES); without a
#                                         display, run the headless demo and print where its report is
#   bash scripts/dev.sh test [PYTEST ARGS...]   lint, validate the napari manifest, run every test
#   bash scripts/dev.sh setup             only set up
#
# An activated virtual environment (VIRTUAL_ENV) is used instead of .venv, so a user's CUDA torch is kept:
# torch is installed only when it cannot be imported.
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        venv="$VIRTUAL_ENV"
    else
        venv=".venv"
        if [ ! -x "$venv/bin/python" ]; then
            "${PYTHON:-python3}" -m venv "$venv"
        fi
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    if ! python -c "import torch" >/dev/null 2>&1; then
        # pinned so pip takes a CPU wheel where one is provided; a bare 'torch' pulls a multi-GB CUDA build
        python -m pip install --quiet "torch==2.13.0"
    fi
    stamp="$venv/.napari-dagman-installed"
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! python -c "import napari_dagman" >/dev/null 2>&1; then
        python -m pip install --quiet -e ".[testing]"
        echo "$want" > "$stamp"
    fi
}

have_display() {
    [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]
}

cmd="${1:-run}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    run)
        setup
        if have_display; then
            exec napari-dagman view "$@"
        fi
        # no screen to show napari on: the same capabilities headless, as a report to open in a browser
        echo "no display: running 'napari-dagman demo --quick' (a few minutes) instead of opening napari" >&2
        exec napari-dagman demo --quick --out napari-dagman-demo
        ;;
    test)
        setup
        if ! have_display && ! command -v Xvfb >/dev/null 2>&1; then
            echo "the viewer tests need a display or Xvfb: apt-get install xvfb libxcb-icccm4 libxcb-keysyms1" >&2
            exit 1
        fi
        unset QT_QPA_PLATFORM  # offscreen breaks napari's rendering; pytest-xvfb provides an X server
        ruff check src tests benchmarks scripts
        npe2 validate napari-dagman
        exec python -m pytest -q -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh [run|test|setup] [args...]" >&2
        exit 2
        ;;
esac
