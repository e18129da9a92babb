"""Replacing modules in a model while keeping their state: the walk over the
module tree and the takeover of parameters, buffers, mode and hooks that
convert.py (convert_model) and distributed.py
(MaskedSyncBatchNorm.convert_sync_batchnorm) share. A leaf module: it imports
nothing from masknorm, so neither of those needs the other."""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn
from torch.nn.utils import parametrize

# Per-module hook dictionaries, moved to the replacement (the same dict
# objects, so handles from register_*_hook keep working).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def uses_forward_of(module: nn.Module, *bases: type) -> bool:
    """Whether ``module`` is an instance of one of ``bases`` running that
    base's own ``forward``. A subclass with its own forward (a masked module,
    or any custom one) is left alone: replacing it would drop that forward. So
    is a parametrized module, whose class parametrize made."""
    if parametrize.is_parametrized(module):
        return False
    forward = type(module).forward
    return any(isinstance(module, base) and forward is base.forward for base in bases)


def take_over(new: nn.Module, old: nn.Module) -> nn.Module:
    """Gives ``new`` the state of ``old``: the same Parameter and buffer
    objects, mode, hooks and any other instance attributes."""
    new._parameters.clear()
    new._parameters.update(old._parameters)
    new._buffers.clear()
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.training = old.training
    for name in _HOOK_DICTS:
        if name in vars(old):
            setattr(new, name, getattr(old, name))
    for name, value in vars(old).items():
        if name not in vars(new):  # e.g. qconfig, user attributes
            vars(new)[name] = value
    return new


def replace_modules(module: nn.Module, counterpart: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Replaces, in place, every module ``m`` of the tree rooted at ``module``
    for which ``counterpart(m)`` returns a new module, which takes over ``m``'s
    state. Returns ``module``, or its replacement when it is replaced itself. A
    module shared by several parents stays shared."""
    done: Dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        new = counterpart(m)
        result = m if new is None else take_over(new, m)
        done[id(m)] = result
        for name, child in list(m._modules.items()):
            if child is not None:
                result._modules[name] = visit(child)
        return result

    return visit(module)
