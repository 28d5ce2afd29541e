"""srae's version, on the bottom floor: the engine records it in manifests without importing the package root
(whose lazy ``Pipeline`` is the Python API, a floor above the engine)."""

__version__ = "0.1.0"
