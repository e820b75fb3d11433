"""The CycleGAN trainer behind ``dicom-node train``."""
