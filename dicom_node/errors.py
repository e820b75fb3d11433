"""The node's exception types: the engine's (:mod:`dicom_node.engine.errors`), re-exported.

They live in the engine, the lowest layer that raises them, so the engine and the trainer
need nothing from the node; the node's modules keep importing them from here.
"""
from dicom_node.engine.errors import UnsupportedImage, UserError

__all__ = ["UserError", "UnsupportedImage"]
