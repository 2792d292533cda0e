"""Model-side helpers: the CIFAR-style nets of the KD literature (registered in timm on import)
and feature/embedding taps for any timm model."""

import timm
from timm.data import resolve_data_config

from . import cifar  # registers the CIFAR nets in timm


def data_config(model_name, img_size=None, input_size=None):
    """timm's data config (input_size, mean, std, crop_pct, ...) for ``model_name``, read from its
    pretrained_cfg without building the model; ``img_size``/``input_size`` override its size as
    timm train.py's flags do."""
    if model_name in cifar.CIFAR_MODELS:
        pretrained_cfg = cifar.CIFAR_PRETRAINED_CFG
    else:
        found = timm.models.get_pretrained_cfg(model_name, allow_unregistered=True)
        pretrained_cfg = found.to_dict() if found is not None else {}
    return resolve_data_config({"img_size": img_size, "input_size": input_size},
                               pretrained_cfg=pretrained_cfg)
