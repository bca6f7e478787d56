"""Erasure methods in one harness: Receler and its ablations, ESD-x, ESD-u, UCE, RECE,
SPEED, MACE and SLD.

    from receler.methods import METHODS, erase_with, load_edit, remove_edit

    erase_with("esd-x", pipe, TrainConfig(concepts="car", lr=1e-5), "runs/esd-x-car")
    load_edit(fresh_pipe, "runs/esd-x-car")     # dispatches on eraser_config.json's method
"""

from .edits import EDIT_FILE, EditConfig
from .esd import EsdTrainer, esd_parameter_names
from .mace import MaceOptions, mace_weights
from .rece import ReceOptions, rece_weights
from .registry import (
    METHODS,
    Method,
    edit_disabled,
    erase_with,
    get_method,
    load_edit,
    method_config,
    method_options,
    remove_edit,
    trainable_parameters,
)
from .sld import SldOptions
from .speed import SpeedOptions, speed_weights
from .uce import UceOptions, uce_parameter_names, uce_weights

__all__ = [
    "EDIT_FILE", "METHODS", "EditConfig", "EsdTrainer", "MaceOptions", "Method", "ReceOptions", "SldOptions",
    "SpeedOptions", "UceOptions", "edit_disabled", "erase_with", "esd_parameter_names", "get_method", "load_edit",
    "mace_weights", "method_config", "method_options", "rece_weights", "remove_edit", "speed_weights",
    "trainable_parameters", "uce_parameter_names", "uce_weights",
]
