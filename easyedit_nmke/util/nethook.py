"""Small forward-hook helpers: read or rewrite the input/output of named submodules.

Decoder blocks return a tensor or a tuple whose first item is the hidden state,
depending on the architecture and transformers version; ``hidden_of`` /
``replace_hidden`` hide that difference.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise LookupError(f"module {name!r} not found in {type(model).__name__}") from exc


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    for n, p in model.named_parameters(remove_duplicate=False):
        if n == name:
            return p
    raise LookupError(f"parameter {name!r} not found in {type(model).__name__}")


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states of a module output (the first element of a tuple/list output)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden``, in the same container type."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


@contextlib.contextmanager
def capture(
    model: nn.Module, names: List[str], inputs: bool = False, detach: bool = True
) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the hidden output (or first positional input) of each named module."""
    record: Dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = get_module(model, name)

        def hook(mod, args, output, _name=name):
            value = args[0] if inputs else hidden_of(output)
            record[_name] = value.detach() if detach else value

        handles.append(module.register_forward_hook(hook))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a hook to skip the layers above the last one a caller needs."""


@contextlib.contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """Abort the forward pass once module ``name`` has run.

    The ``with`` block ends at that point without an error, so the forward call should be
    its last statement; hooks registered before this one (``capture``) have recorded by then.
    """

    def hook(mod, args, output):
        raise StopForward

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextlib.contextmanager
def edit_output(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]
) -> Iterator[None]:
    """Replace the hidden output of module ``name`` by ``fn(hidden)`` (None keeps it)."""
    module = get_module(model, name)

    def hook(mod, args, output):
        new = fn(hidden_of(output))
        return None if new is None else replace_hidden(output, new)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def record_calls(model: nn.Module, names: List[str]) -> Iterator[Dict[str, tuple]]:
    """Record ``(args, kwargs)`` of the (last) call of each named module, as the module received them.

    Lets a caller replay a block later with the attention mask, position embeddings
    and cache arguments the model itself built for it, whatever the architecture.
    """
    record: Dict[str, tuple] = {}
    handles = []
    for name in names:

        def hook(mod, args, kwargs, _name=name):
            record[_name] = (tuple(args), dict(kwargs))

        handles.append(get_module(model, name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
