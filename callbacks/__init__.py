"""Callbacks that plug into RLVRModule through :mod:`relax_pl.extension` (installed as ``relax_pl.callbacks``)."""

from relax_pl.callbacks.effective_rank import EffectiveRankShaping
from relax_pl.callbacks.koopman_fit import KoopmanFit
from relax_pl.callbacks.latent_exploration import LatentExploration
from relax_pl.callbacks.monitoring import ImageSampleLogger, SampleLogger
from relax_pl.callbacks.repexp import RepExp
from relax_pl.callbacks.spectrum import SpectrumMonitor

__all__ = [
    "EffectiveRankShaping", "ImageSampleLogger", "KoopmanFit", "LatentExploration", "RepExp", "SampleLogger",
    "SpectrumMonitor",
]
