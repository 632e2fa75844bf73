"""Callbacks that plug into RLVRModule through :mod:`relax_pl.extension` (installed as ``relax_pl.callbacks``)."""

from relax_pl.callbacks.monitoring import SampleLogger

__all__ = ["SampleLogger"]
