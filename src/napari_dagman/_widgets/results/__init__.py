"""The segmentation results dock: predictions, the per-organ table that moves the viewer, exports."""
