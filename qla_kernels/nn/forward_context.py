"""Tensors one module hands another within a single forward call, kept per thread.

Some hand-offs cannot be arguments: a fused decoder block computes q/k/v in one packed GEMM and
the residual for the attention output projection, but the model's own attention code calls those
projections; a hook on a norm computes an adapter's T for the linear after it. Such a tensor is
`put` for its receiver and `take`n by it, inside a *scope*: the scope is opened when the module
that holds both ends starts its forward and cleared when that forward ends, by return or by
exception (`scope_hooks`, or `enter`/`leave` in a try/finally). The values live in a thread-local
dict keyed by (receiver, slot), never on a module: calls from several threads each see their own,
nothing outlives the call, and a module's state is the same before and after every runtime
forward. Scopes nest (a model's scope holds its blocks'); the outermost one owns the values.
torch.compile traces all of it (thread-local reads and writes) without graph breaks.
"""

from __future__ import annotations

import threading
from typing import Any, List

from torch import nn

_local = threading.local()


def enter() -> None:
    """Opens a scope (or joins the one already open in this thread)."""
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.values = {}
    _local.depth = depth + 1


def leave() -> None:
    """Closes the scope `enter` opened; the outermost close drops every value not taken."""
    depth = _local.depth - 1
    _local.depth = depth
    if depth == 0:
        _local.values = None


def isolate() -> tuple:
    """Sets the scope in progress aside (returned, for `restore`): what runs next, until
    `restore`, opens scopes of its own (a probe run of a block inside that block's call)."""
    outer = (getattr(_local, "depth", 0), getattr(_local, "values", None))
    _local.depth, _local.values = 0, None
    return outer


def restore(outer: tuple) -> None:
    _local.depth, _local.values = outer


def put(receiver: nn.Module, slot: str, value: Any) -> None:
    """Hands `value` to `receiver` for this call. Outside any scope there is no call for it to
    reach (the producing module ran on its own): the value is dropped."""
    values = getattr(_local, "values", None)
    if values is not None:
        values[(id(receiver), slot)] = value


def take(receiver: nn.Module, slot: str, default: Any = None) -> Any:
    """What was handed to `receiver` in `slot` during this call (removed), or `default`."""
    values = getattr(_local, "values", None)
    if not values:
        return default
    return values.pop((id(receiver), slot), default)


def peek(receiver: nn.Module, slot: str, default: Any = None) -> Any:
    """`take` without removing the value (a flag or a tensor several modules read)."""
    values = getattr(_local, "values", None)
    if not values:
        return default
    return values.get((id(receiver), slot), default)


def _enter_hook(module, args) -> None:
    enter()
    _local.__dict__.setdefault("hooked_scopes", []).append(id(module))


def _leave_hook(module, args, output) -> None:
    # Also called when a pre-hook before `_enter_hook` raised: then this module opened no scope.
    opened = getattr(_local, "hooked_scopes", None)
    if opened and opened[-1] == id(module):
        opened.pop()
        leave()


def scope_hooks(module: nn.Module) -> List:
    """Makes every call of `module` a scope: a forward pre-hook that runs before any other and a
    forward hook that runs even when the forward raises. Returns their handles."""
    return [module.register_forward_pre_hook(_enter_hook, prepend=True),
            module.register_forward_hook(_leave_hook, always_call=True)]


SCOPE_HOOKS = (_enter_hook, _leave_hook)  # for code that tells hand-off plumbing from other hooks
