"""mee-bench: early-exit generation for T5-family encoder-decoders, measured honestly."""

__version__ = "0.1.0"
