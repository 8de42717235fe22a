"""The lesion-classification dock (`dock.ClassifyWidget`)."""
