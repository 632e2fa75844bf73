"""Callbacks that plug into RLVRModule (installed as ``relax_pl.callbacks``)."""
