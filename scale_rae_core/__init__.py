"""srae engine: everything below the command line (models, data, training, inference, backends)."""

__version__ = "0.1.0"
