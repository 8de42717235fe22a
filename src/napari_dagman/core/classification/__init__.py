"""Classification of cases and lesions from a pretraining run's frozen encoder (``napari-dagman classify``).

A table names the rows (`table`); each image is run through the encoder once and its stage feature map pooled
over each row's box (`features`); a class-balanced linear probe is cross-validated by patient, at several numbers
of labelled rows per class, beside a random-init encoder and an intensity histogram on the same rows and draws
(`splits`, `probe`, `evaluate`); the metrics carry patient-bootstrap intervals (`metrics`) and are written with
their curves (`report`). `job.classify_job` is the whole job as one event generator.
"""

from napari_dagman.core.classification.job import classify_job
from napari_dagman.core.classification.table import ClassTable, read_table

__all__ = ["ClassTable", "classify_job", "read_table"]
