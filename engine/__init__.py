"""The translation engine: style models, the pixel pipeline, seamless tiled inference, SC output.

Public API (stable, see shared CONVENTIONS): :func:`load_style_model`, :func:`translate`.
"""
from .generator import ResnetGenerator
from .model_file import StyleModel, load_style_model, save_style_model, new_style_model

__all__ = ["ResnetGenerator", "StyleModel", "load_style_model", "save_style_model", "new_style_model", "translate"]


def __getattr__(name: str):
    # translate lives in tiling.py; imported lazily so the model file API stays light.
    if name == "translate":
        from .tiling import translate

        return translate
    raise AttributeError(name)
