"""How every Triton kernel of the backend is launched: for which target its configuration is
chosen, on which device, and how a launch can be planned instead of run.

- `Target` holds the device facts launch selection reads (compute capability, SM count, name).
  `target_of(device)` gives the device's; Triton's CPU interpreter is `INTERPRETER`.
- `run_kernel` is the one place a kernel is launched: under a device guard for the input's device
  (Triton launches on the current device and stream, not the tensors'), with the options its
  caller chose (warps, stages, FP contraction). Nothing else in the backend calls `kernel[grid]`.
- `planning(target)` runs the ops on meta tensors on the Triton backend without launching: every
  launch the launch code would make for `target` is recorded (with every autotune candidate), so
  the ahead-of-time check (`aot.py`) compiles exactly what it selects for a real model call.
- `compile_key` is what Triton compiles a launch by (kernel, argument specialization,
  constexprs, options); `QLA_LAUNCH_LOG=FILE` appends the key of every distinct launch a process
  makes to FILE, so a GPU run can be checked against the ahead-of-time table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import threading
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from ..dispatch import selecting



@dataclasses.dataclass(frozen=True)
class Target:
    """The device facts that launch selection depends on. capability (0, 0) is the interpreter."""

    capability: Tuple[int, int]
    sm_count: int
    name: str

    @property
    def interpreter(self) -> bool:
        return self.capability == (0, 0)

    @property
    def arch(self) -> int:
        """The compute capability as Triton's GPUTarget writes it (90 for sm_90)."""
        return 10 * self.capability[0] + self.capability[1]


INTERPRETER = Target((0, 0), 0, "interpreter")
# The architectures the ahead-of-time check compiles for, as launch selection sees them.
H100 = Target((9, 0), 132, "NVIDIA H100 80GB HBM3")
A100 = Target((8, 0), 108, "NVIDIA A100-SXM4-80GB")

_state = threading.local()


def target_of(device: torch.device) -> Target:
    """The target a launch for tensors on `device` is selected for (the planned one while planning)."""
    planned = getattr(_state, "plan", None)
    if planned is not None:
        return planned[0]
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_target(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    properties = torch.cuda.get_device_properties(index)
    return Target((properties.major, properties.minor), properties.multi_processor_count, properties.name)


@dataclasses.dataclass(frozen=True)
class PlannedLaunch:
    """One launch the launch code would make: the kernel, its arguments (meta tensors and ints)
    and its constexprs and options."""

    kernel: object
    grid: Tuple[int, ...]
    args: Tuple[object, ...]
    meta: Dict[str, object]

    @property
    def key(self) -> tuple:
        return compile_key(self.kernel, self.args, self.meta)


@contextlib.contextmanager
def planning(target: Target) -> Iterator[List[PlannedLaunch]]:
    """Inside the block, launch code selects for `target` and records its launches in the yielded
    list instead of running them (pass meta tensors); autotuned launches record every candidate."""
    if target.interpreter:
        raise ValueError("plan launches for a GPU target; the interpreter runs what it is given")
    previous = getattr(_state, "plan", None)
    _state.plan = (target, [])
    try:
        with selecting("triton"):
            yield _state.plan[1]
    finally:
        _state.plan = previous


_recorders: List[List[PlannedLaunch]] = []


@contextlib.contextmanager
def recording() -> Iterator[List[PlannedLaunch]]:
    """Inside the block, every launch that runs is also appended to the yielded list (tests compare
    what models launch with the ahead-of-time table)."""
    launches: List[PlannedLaunch] = []
    _recorders.append(launches)
    try:
        yield launches
    finally:
        _recorders.remove(launches)


def is_planning() -> bool:
    return getattr(_state, "plan", None) is not None


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_REQUIRED_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def run_kernel(kernel, grid: Sequence[int], device: torch.device, args: Sequence[object], **meta) -> None:
    """Launches `kernel[grid](*args, **meta)` on `device` (or records it while planning). Every
    launch names its warps, stages and FP contraction: Triton's defaults (3 stages, contraction
    on) are choices the ahead-of-time check would not see."""
    if any(option not in meta for option in _REQUIRED_OPTIONS):
        raise ValueError(f"{kernel_name(kernel)}: a launch must set {_REQUIRED_OPTIONS}")
    planned = getattr(_state, "plan", None)
    if planned is not None:
        planned[1].append(PlannedLaunch(kernel, tuple(grid), tuple(args), dict(meta)))
        return
    if _LAUNCH_LOG:
        _log_launch(kernel, args, meta, device)
    for recorder in _recorders:
        recorder.append(PlannedLaunch(kernel, tuple(grid), tuple(args), dict(meta)))
    with _device_guard(device):
        kernel[tuple(grid)](*args, **meta)


# ---------------------------------------------------------------- compile keys

_TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "u1",
}


def specialization(value, specialize: bool = True) -> Tuple[str, object]:
    """How Triton's JIT specializes one runtime argument (triton/runtime/jit.py): tensors by dtype
    and 16-byte alignment, ints equal to 1 as constants, other ints by width and divisibility by
    16 (unless the kernel says do_not_specialize), floats as fp32. `aot.py` checks this equals the
    JIT's own binder for every planned launch."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        width = "i32" if -2**31 <= value < 2**31 else "u64" if value >= 2**63 else "i64"
        if not specialize:
            return width, None
        if value == 1:
            return "constexpr", 1
        return width, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no Triton specialization for {type(value).__name__}")


def kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


@functools.lru_cache(maxsize=None)
def _parameters(kernel) -> Tuple[Tuple[str, ...], Dict[str, object], frozenset]:
    """(runtime argument names, constexpr defaults, names not specialized) of a jit kernel,
    interpreted or not."""
    signature = inspect.signature(kernel.fn)
    names, defaults = [], {}
    for name, parameter in signature.parameters.items():
        if "constexpr" in str(parameter.annotation):
            if parameter.default is not inspect.Parameter.empty:
                defaults[name] = parameter.default
        else:
            names.append(name)
    unspecialized = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
    every = list(signature.parameters)
    unspecialized = frozenset(every[entry] if isinstance(entry, int) else entry for entry in unspecialized or ())
    return tuple(names), defaults, unspecialized


def argument_specializations(kernel, args: Sequence[object]) -> Tuple[Tuple[str, Tuple[str, object]], ...]:
    """((name, specialization), ...) of a launch's runtime arguments."""
    names, _, unspecialized = _parameters(kernel)
    if len(names) != len(args):
        raise ValueError(f"{kernel_name(kernel)} takes {len(names)} runtime arguments, got {len(args)}")
    return tuple((name, specialization(value, name not in unspecialized)) for name, value in zip(names, args))


def compile_key(kernel, args: Sequence[object], meta: Dict[str, object]) -> tuple:
    """(kernel name, ((argument, specialization), ...), ((constexpr or option, value), ...)):
    two launches with the same key run the same compiled kernel on a given architecture. A
    constexpr declared with the default False is a feature flag added after the kernel had
    launches recorded: a launch that leaves it unset compiles what the kernel compiled before the
    flag existed, and is keyed without it."""
    options = {name: value for name, value in _parameters(kernel)[1].items() if value is not False}
    options.update(meta)
    return kernel_name(kernel), argument_specializations(kernel, args), tuple(sorted(options.items()))


# Constexprs and options that follow from sizes or from the target's tiles, not from what a call
# computes: a launch class leaves them out, so small test models and real models compare.
_SIZE_CHOICES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_T", "BLOCK_C", "GROUP_M", "GROUP_SCALE_PER_TILE",
                 "SPLIT_PHASE", "num_warps", "num_stages")


def launch_class(launch: PlannedLaunch) -> str:
    """What a launch computes, independent of sizes and tiles: the kernel, its other constexprs and
    options, and its pointer dtypes (JSON, for comparing sets)."""
    pointers = [(name, spec[0]) for (name, spec), value in zip(argument_specializations(launch.kernel, launch.args),
                                                              launch.args) if isinstance(value, torch.Tensor)]
    meta = sorted((key, value) for key, value in launch.meta.items() if key not in _SIZE_CHOICES)
    return json.dumps([kernel_name(launch.kernel), pointers, meta])


def key_to_json(key: tuple) -> str:
    return json.dumps(key, sort_keys=True, default=str)


_LAUNCH_LOG = os.environ.get("QLA_LAUNCH_LOG")
_logged: set = set()
_log_lock = threading.Lock()


def _log_launch(kernel, args, meta, device: torch.device) -> None:
    line = key_to_json([target_of(device).arch, compile_key(kernel, args, meta)])
    with _log_lock:
        if line in _logged:
            return
        _logged.add(line)
        with open(_LAUNCH_LOG, "a") as handle:
            handle.write(line + "\n")


def read_launch_log(path: str) -> List[Tuple[int, str]]:
    """(architecture, compile key as key_to_json writes it) of each launch in a QLA_LAUNCH_LOG file."""
    entries = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                arch, key = json.loads(line)
                entries.append((arch, json.dumps(key, sort_keys=True)))
    return entries
