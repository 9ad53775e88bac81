"""Leave the user's state as found: the modules, optimizers and RNGs a probe in this process
touches, found from a ``train_step`` and restored bit for bit."""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["UserStateGuard", "reachable_state"]


#: how far :func:`reachable_state` walks from a ``train_step``: objects followed, nesting,
#: items looked at per container (a data set held in a list is not walked sample by sample)
_REACH_OBJECTS = 50_000
_REACH_DEPTH = 8
_REACH_ITEMS = 1000


def reachable_state(root: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """The modules, optimizers and other stateful training objects (LR schedulers,
    GradScalers) a callable can reach: ``(modules, optimizers, others)``.

    Followed from ``root``: a function's closure cells, default arguments and the globals its
    code names (``co_names`` of it and its nested code; of a global Python module, the
    attributes those names name); functions it reaches the same way, unless they are
    installed code (stdlib, site-packages: their globals are not the user's); a bound
    method's ``__self__``; a ``functools.partial``'s function and arguments; dicts, lists,
    tuples and sets; other objects' ``__dict__`` and ``__slots__``. Nothing is followed
    inside a module (its ``state_dict`` holds the rest) and no tensor is looked into. A
    module that is a submodule of another one found is left out (its parent covers it).
    """
    import contextlib
    import functools
    import itertools
    import types

    import torch

    stateful: tuple[type, ...] = (torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler)
    modules: list[Any] = []
    optimizers: list[Any] = []
    others: list[Any] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    installed = _installed_prefixes()
    atoms = (str, bytes, int, float, complex, bool, type(None), type, torch.Tensor)
    while stack and len(seen) < _REACH_OBJECTS:
        obj, depth = stack.pop()
        if id(obj) in seen or isinstance(obj, atoms):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            modules.append(obj)
            continue
        if isinstance(obj, torch.optim.Optimizer):
            optimizers.append(obj)
            continue
        if isinstance(obj, stateful):
            others.append(obj)
        if depth >= _REACH_DEPTH:
            continue
        children: list[Any] = []
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    children.append(cell.cell_contents)
            children.extend(obj.__defaults__ or ())
            children.extend((obj.__kwdefaults__ or {}).values())
            if not obj.__code__.co_filename.startswith(installed):
                names = _code_names(obj.__code__)
                for name in names:
                    value = obj.__globals__.get(name)
                    if isinstance(value, types.ModuleType):
                        members = vars(value)
                        children.extend(members[n] for n in names if n in members)
                    elif value is not None:
                        children.append(value)
        elif isinstance(obj, types.MethodType):
            children += [obj.__self__, obj.__func__]
        elif isinstance(obj, functools.partial):
            children += [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, dict):
            children.extend(itertools.islice(obj.values(), _REACH_ITEMS))
        elif isinstance(obj, list | tuple | set | frozenset):
            children.extend(itertools.islice(obj, _REACH_ITEMS))
        elif not isinstance(obj, types.ModuleType | types.BuiltinFunctionType):
            # best effort: an object whose attribute access runs code may raise anything
            with contextlib.suppress(Exception):
                children.extend(itertools.islice(vars(obj).values(), _REACH_ITEMS))
            with contextlib.suppress(Exception):
                for name in getattr(type(obj), "__slots__", ()):
                    if isinstance(name, str) and hasattr(obj, name):
                        children.append(getattr(obj, name))
        stack.extend((child, depth + 1) for child in reversed(children))
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner], optimizers, others


def _code_names(code: Any) -> set[str]:
    """Global and attribute names a code object and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def _installed_prefixes() -> tuple[str, ...]:
    """Where installed code lives (stdlib, site-packages), not the user's."""
    import sysconfig

    paths = sysconfig.get_paths()
    return tuple({paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths})


class UserStateGuard:
    """Snapshot of modules, optimizers and the RNGs, restored bit for bit by ``restore``.

    Per module (``model`` and ``modules``; a lazy module among ``modules``, whose
    parameters have no values yet, is left out and listed in ``lazy``): weights and buffers
    (copied to CPU; BatchNorm running statistics and ``num_batches_tracked`` too), gradients,
    ``requires_grad``, each submodule's train/eval mode. Per optimizer: its state dict (with
    ``param_groups``: learning rates) and the values and gradients of every parameter it
    updates that no guarded module holds (a ``train_step`` may train weights no ``model``
    names). ``others`` (LR schedulers, GradScalers): their state dicts. Always: the Python,
    NumPy, torch CPU and CUDA random states.
    """

    def __init__(
        self,
        model: Any = None,
        optimizer: Any = None,
        *,
        modules: Sequence[Any] = (),
        optimizers: Sequence[Any] = (),
        others: Sequence[Any] = (),
    ) -> None:
        import copy

        import torch

        self.model = model
        self.optimizer = optimizer
        # a lazy module reached from a train_step: the probe initialises it, and there is no
        # uninitialised state to put back (its parameters have no values to copy)
        inside = {id(sub) for sub in model.modules()} if model is not None else set()
        reached = _unique([m for m in modules if id(m) not in inside])
        self.lazy = [m for m in reached if _is_lazy(m)]
        self.modules = _unique([model, *(m for m in reached if not _is_lazy(m))])
        self.optimizers = _unique([optimizer, *optimizers])
        self.others = _unique(list(others))
        self._models = [_ModuleState(m) for m in self.modules]
        held = {id(p) for m in self.modules for p in m.parameters()}
        self._optimizer_states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        self._optimizer_params = _unique(
            [
                p
                for o in self.optimizers
                for group in o.param_groups
                for p in group["params"]
                if id(p) not in held
            ]
        )
        self._optimizer_values = [
            (p.detach().to("cpu", copy=True), None if p.grad is None else p.grad.detach().clone())
            for p in self._optimizer_params
        ]
        self._other_states = [copy.deepcopy(o.state_dict()) for o in self.others]
        self._python_rng = random.getstate()
        numpy = sys.modules.get("numpy")
        self._numpy_rng = numpy.random.get_state() if numpy is not None else None
        self._torch_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        """Put everything back as it was when the guard was made."""
        import torch

        for state in self._models:
            state.restore()
        with torch.no_grad():
            for p, (value, grad) in zip(
                self._optimizer_params, self._optimizer_values, strict=True
            ):
                p.copy_(value)
                p.grad = grad
        for optimizer, saved in zip(self.optimizers, self._optimizer_states, strict=True):
            optimizer.load_state_dict(saved)
        for other, saved in zip(self.others, self._other_states, strict=True):
            other.load_state_dict(saved)
        random.setstate(self._python_rng)
        numpy = sys.modules.get("numpy")
        if numpy is not None and self._numpy_rng is not None:
            numpy.random.set_state(self._numpy_rng)
        torch.set_rng_state(self._torch_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)


class _ModuleState:
    """One module's weights, buffers, gradients, ``requires_grad`` flags and modes."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        params = list(module.parameters())
        self._grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        self._requires_grad = [p.requires_grad for p in params]
        self._modes = [m.training for m in module.modules()]

    def restore(self) -> None:
        """Put the module back; one that gained weights during the probe (a Keras model
        built by its first call) gets back those it had, and a warning says the rest stay."""
        import torch

        grown = set(self.module.state_dict()) != set(self._state)
        with torch.no_grad():
            self.module.load_state_dict(self._state, strict=not grown)
        params, modules = list(self.module.parameters()), list(self.module.modules())
        if len(params) == len(self._grads):
            for p, grad, flag in zip(params, self._grads, self._requires_grad, strict=True):
                p.grad = grad
                p.requires_grad_(flag)
        if len(modules) == len(self._modes):
            for m, mode in zip(modules, self._modes, strict=True):
                m.training = mode
        if grown:
            import warnings

            from bsfinder.errors import BsfinderWarning

            warnings.warn(
                f"{type(self.module).__name__} was built during the probe (it had no weights "
                "before, as an unbuilt Keras model): the weights the probe's steps created "
                "stay; build it before probing to have it restored exactly",
                BsfinderWarning,
                stacklevel=2,
            )


def _is_lazy(module: Any) -> bool:
    from torch.nn.parameter import is_lazy

    return any(is_lazy(t) for t in (*module.parameters(), *module.buffers()))


def _unique(items: list[Any]) -> list[Any]:
    """``items`` without None and without repeating an object (by identity), in order."""
    seen: set[int] = set()
    kept = []
    for item in items:
        if item is not None and id(item) not in seen:
            seen.add(id(item))
            kept.append(item)
    return kept
