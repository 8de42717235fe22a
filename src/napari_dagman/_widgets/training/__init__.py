"""The training docks: pretraining and fine-tuning on one base (`TrainingDock`)."""
