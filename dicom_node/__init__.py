"""dicom-node: a DICOM node that restyles radiographs to each radiologist's preferred look.

Keep this module free of imports from the node's modules: ``import dicom_node.engine`` (and
``dicom_node.train``) runs it first, and the engine and trainer must not depend on the node.
"""
from dicom_node.engine.version import __version__

__all__ = ["__version__"]
