"""The napari face: dock widgets, thin over `napari_dagman.core` (one module per dock)."""
