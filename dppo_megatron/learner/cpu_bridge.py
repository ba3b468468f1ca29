"""Run Megatron Core on a machine without CUDA (CPU tensors, gloo).

Megatron Core assumes CUDA in a handful of places even on its plain-torch ("local") path:
streams and events around the MoE dispatcher, `torch.cuda.current_device()` as a device, the
CUDA RNG behind its RNG tracker and activation recompute, CUDA-only tensor checks in the
optimizer, and (0.16.1) a TransformerEngine name read in the MoE router. This module maps
each of them to its CPU meaning. It is applied only when CUDA is absent (on a GPU nothing is
patched), it is the only place that patches Megatron, and it logs every call site it catches
the first time, so that an upgrade that adds a new CUDA-only call shows up at once. A patch
that replaces one of Megatron's own functions says which releases it was written for
(`_targets`) and steps aside, with a warning, on any other.

One more fix lives here because it is the same kind of thing: without TransformerEngine or
Apex, Megatron's distributed optimizer falls back to torch Adam, whose per-parameter `step`
its reshardable checkpoint loader does not expect (`apply_torch_adam_checkpoint_fix`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading

import torch

log = logging.getLogger(__name__)

# The releases the CPU suite passed on: 0.16.1 (Python 3.11), 0.19.x (Python 3.12).
TESTED_MEGATRON = ">=0.16.1,<0.20"

_applied = False
_adam_fix_applied = False
_lock = threading.Lock()
# (what was caught, "file:line" of the caller) -> count
caught_call_sites: dict[tuple[str, str], int] = {}


def apply_cpu_bridge() -> bool:
    """Patch Megatron Core's CUDA assumptions if CUDA is absent. Returns whether it is active."""
    global _applied
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _applied:
            _patch_torch_cuda()
            _patch_megatron()
            _applied = True
    return True


def apply_torch_adam_checkpoint_fix() -> bool:
    """When the distributed optimizer runs on torch Adam (no TE / Apex), fix two things in its
    checkpoint load (megatron-core 0.16.1): the reshardable loader tries to copy Adam's
    per-parameter `step` from the loaded tensors, which never hold it (KeyError); and the
    loader gives every parameter the same `step` tensor object, which torch Adam increments in
    place once per parameter, so every parameter after the first gets a wrong bias correction
    on the next step. Returns whether the fix is active."""
    global _adam_fix_applied
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return False
    if not _targets("the torch-Adam checkpoint fix", TESTED_MEGATRON):  # still needed in 0.19.2
        return False
    with _lock:
        if _adam_fix_applied:
            return True
        cls = distrib_optimizer.DistributedOptimizer
        original = cls._set_main_param_and_optimizer_states

        def set_states(self, model_param, tensors):
            if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return original(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state.get(self.optimizer.param_groups[group_index]["params"][group_order])
            if state is None or "step" not in state:
                return original(self, model_param, tensors)
            _caught("DistributedOptimizer._set_main_param_and_optimizer_states without step")
            step = state.pop("step")
            try:
                return original(self, model_param, tensors)
            finally:
                state["step"] = step

        original_load = cls.load_state_dict

        def load_state_dict(self, state_dict):
            original_load(self, state_dict)
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()

        cls._set_main_param_and_optimizer_states = set_states
        cls.load_state_dict = load_state_dict
        _adam_fix_applied = True
    return True


def megatron_version():
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("megatron-core"))


def _targets(patch: str, versions: str) -> bool:
    """Whether the installed megatron-core is a release `patch` was written for (`versions`, a
    PEP 440 range). Elsewhere the Megatron function it replaces may differ: it steps aside."""
    from packaging.specifiers import SpecifierSet

    installed = megatron_version()
    if SpecifierSet(versions).contains(installed, prereleases=True):
        return True
    log.warning("cpu bridge: %s was written for megatron-core %s, this is %s: not applied", patch, versions,
                installed)
    return False


def _caught(what: str, depth: int = 2) -> None:
    frame = sys._getframe(depth)
    site = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    key = (what, site)
    if key not in caught_call_sites:
        log.debug("cpu bridge: %s at %s", what, site)
        caught_call_sites[key] = 0
    caught_call_sites[key] += 1


class _CpuStream:
    """A CUDA stream on CPU: work is already ordered, so every operation is a no-op."""

    def __init__(self, *args, **kwargs):
        _caught("torch.cuda.Stream", depth=2)

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _CpuStream)

    def __hash__(self) -> int:
        return 0


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream.__new__(_CpuStream)


# Megatron modules that create tensors with a literal device="cuda".
_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
_FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange",
    "zeros_like", "ones_like", "empty_like", "full_like",
})


class _TorchOnCpu:
    """Stands in for `torch` inside one Megatron module: tensor factories asked for a CUDA
    device make CPU tensors; everything else is torch itself."""

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name not in _FACTORIES:
            return value

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                _caught(f"torch.{name}(device='cuda')")
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return factory


def _patch_torch_cuda() -> None:
    cuda = torch.cuda

    def current_device():
        _caught("torch.cuda.current_device")
        return "cpu"

    def current_stream(device=None):
        _caught("torch.cuda.current_stream")
        return _CPU_STREAM

    def stream(s=None):
        _caught("torch.cuda.stream")
        return contextlib.nullcontext()

    def event(*args, **kwargs):
        _caught("torch.cuda.Event")
        return _CpuEvent()

    def synchronize(device=None):
        _caught("torch.cuda.synchronize")

    def record_stream(self, stream):
        _caught("Tensor.record_stream")

    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        # Megatron's optimizers accept only parameters whose type() is a torch.cuda.* name.
        if dtype is None and "megatron/core/optimizer" in sys._getframe(1).f_code.co_filename:
            _caught("Tensor.type() in the optimizer")
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    def tensor_cuda(self, *args, **kwargs):
        _caught("Tensor.cuda")
        return self

    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = tensor_cuda
    cuda.current_device = current_device
    cuda.current_stream = current_stream
    cuda.stream = stream
    cuda.Stream = _CpuStream
    cuda.Event = event
    cuda.synchronize = synchronize
    torch.Tensor.record_stream = record_stream


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils

    # RNG: the tracker's named states and activation recompute use the CUDA generator; on CPU
    # they are states of the CPU generator.
    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        _caught("tensor_parallel.random._get_cuda_rng_state")
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        _caught("tensor_parallel.random._set_cuda_rng_state")
        torch.set_rng_state(new_state)

    def tracker_add(self, name, seed):
        _caught("CudaRNGStatesTracker.add")
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def tracker_fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # The CUDA version also warns when the CPU state changes inside the fork, which on CPU
        # is the point of the fork; otherwise the same bookkeeping.
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        original = torch.get_rng_state()
        original_name = self._current_state_name
        if original_name != "default-rng":
            self.states_[original_name] = original
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if original_name != "default-rng":
                original = self.states_[original_name]
            torch.set_rng_state(original)
            self._current_state_name = original_name

    mcore_random._get_cuda_rng_state = get_rng_state
    mcore_random._set_cuda_rng_state = set_rng_state
    if _targets("the RNG tracker's add and fork on the CPU generator", TESTED_MEGATRON):
        mcore_random.CudaRNGStatesTracker.add = tracker_add
        mcore_random.CudaRNGStatesTracker.fork = tracker_fork

    # The alltoall dispatcher hands split sizes to all_to_all_single as numpy arrays, but only
    # converts CUDA tensors.
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            _caught("moe_utils.maybe_move_tensor_to_cpu")
            return tensor.numpy() if as_numpy else tensor
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    for module in list(sys.modules.values()):
        if getattr(module, "maybe_move_tensor_to_cpu", None) is original_move:
            module.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    for name in _MODULES_WITH_CUDA_FACTORIES:
        importlib.import_module(name).torch = _TorchOnCpu()

    # 0.16's router reads `te_general_gemm`, defined only when TransformerEngine imports (0.19
    # defines it either way).
    if not hasattr(moe_utils, "te_general_gemm") and _targets("te_general_gemm = None", ">=0.16,<0.19"):
        moe_utils.te_general_gemm = None
