"""dicom-node: a DICOM node that restyles radiographs to each radiologist's preferred look."""

__version__ = "0.1.0"
