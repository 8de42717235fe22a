"""``python -m napari_dagman.cli`` (what ``torchrun -m`` needs)."""

import sys

from napari_dagman.cli import main

sys.exit(main())
