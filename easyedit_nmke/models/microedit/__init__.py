"""MicroEdit: SAE decoder-row editing with an ARD switch (EasyEdit method folder)."""
from .microedit_hparams import MicroEditHyperParams
from .microedit_main import (
    apply_microedit_to_model,
    edited_parameter_names,
    execute_microedit,
    load_method_state,
    phase_seconds,
    prepare_method,
    prepare_state,
    reset_microedit_state,
    routing_report,
    save_method_state,
)
from .sae_hook import SAESwitch
from .state import MicroEditState, detach_microedit, get_state

__all__ = [
    "MicroEditHyperParams",
    "MicroEditState",
    "SAESwitch",
    "apply_microedit_to_model",
    "detach_microedit",
    "edited_parameter_names",
    "execute_microedit",
    "get_state",
    "load_method_state",
    "phase_seconds",
    "prepare_method",
    "prepare_state",
    "reset_microedit_state",
    "routing_report",
    "save_method_state",
]
