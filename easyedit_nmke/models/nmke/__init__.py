"""NMKE: Neuron-Specific Masked Knowledge Editing (EasyEdit method folder)."""
from .nmke_hparams import NMKEHyperParams
from .nmke_main import (
    apply_nmke_to_model,
    edited_parameter_names,
    execute_nmke,
    load_method_state,
    null_space_report,
    phase_seconds,
    prepare_method,
    prepare_state,
    reset_nmke_state,
    save_method_state,
)
from .state import NMKEState, detach_nmke_state, get_state

__all__ = [
    "NMKEHyperParams",
    "NMKEState",
    "apply_nmke_to_model",
    "detach_nmke_state",
    "edited_parameter_names",
    "load_method_state",
    "null_space_report",
    "phase_seconds",
    "prepare_method",
    "save_method_state",
    "execute_nmke",
    "get_state",
    "prepare_state",
    "reset_nmke_state",
]
