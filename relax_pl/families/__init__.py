"""Model-family adapters, one file per family, found by the checkpoint's ``config.model_type``:

* ``llama.py``: Llama, SmolLM2; ``qwen2.py``: Qwen2, Qwen2.5;
* ``qwen2_vl.py``: Qwen2-VL and Qwen2.5-VL (image token, processor, image rows, rotary positions).

``base.py`` holds the seam (:class:`ModelFamily`, :func:`family_of`). Every file in this folder is imported here, so
a new family is one new file (README, "Write a model family").
"""

import importlib
import pkgutil

from relax_pl.families.base import FAMILIES, ModelFamily, family_of, unwrap

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def final_norm(model):
    """The module whose output is ``model``'s final-norm hidden state (its family's :meth:`ModelFamily.final_norm`)."""
    return family_of(model).final_norm(model)


__all__ = ["FAMILIES", "ModelFamily", "family_of", "final_norm", "unwrap"]
