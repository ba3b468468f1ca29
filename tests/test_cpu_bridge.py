"""The CPU bridge patches Megatron only without CUDA, and reports what it catches."""

import subprocess
import sys

GPU_CASE = """
import torch
torch.cuda.is_available = lambda: True
original_stream = torch.cuda.Stream
from dppo_megatron.learner.cpu_bridge import apply_cpu_bridge
assert apply_cpu_bridge() is False
assert torch.cuda.Stream is original_stream
print("untouched")
"""

CPU_CASE = """
from dppo_megatron.learner.cpu_bridge import apply_cpu_bridge, caught_call_sites
import torch
assert apply_cpu_bridge() is True and apply_cpu_bridge() is True
from megatron.core.pipeline_parallel import schedules
schedules.torch.zeros([], dtype=torch.int, device="cuda")
torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
print(sorted({what for what, site in caught_call_sites}))
"""


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_nothing_is_patched_when_cuda_is_present():
    assert run(GPU_CASE).strip() == "untouched"


def test_cuda_calls_are_mapped_to_cpu_and_their_call_sites_recorded():
    out = run(CPU_CASE).splitlines()
    assert out[0] == "['torch.cuda.Stream', 'torch.cuda.current_stream', \"torch.zeros(device='cuda')\"]"


NEWER_MEGATRON_CASE = """
import logging
from packaging.version import Version
from dppo_megatron.learner import cpu_bridge
from megatron.core.tensor_parallel import random as mcore_random
logging.basicConfig(level=logging.WARNING, format="%(message)s")
fork = mcore_random.CudaRNGStatesTracker.fork
cpu_bridge.megatron_version = lambda: Version("0.20.0")
assert cpu_bridge.apply_cpu_bridge() is True
assert mcore_random.CudaRNGStatesTracker.fork is fork  # its replacement was written for < 0.20
print("kept")
"""


def test_a_patch_steps_aside_on_a_megatron_release_it_was_not_written_for():
    result = subprocess.run([sys.executable, "-c", NEWER_MEGATRON_CASE], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "kept"
    assert ("the RNG tracker's add and fork on the CPU generator was written for megatron-core >=0.16.1,<0.20, "
            "this is 0.20.0: not applied") in result.stderr


def test_every_patch_applies_on_the_installed_megatron_release():
    from dppo_megatron.learner.cpu_bridge import TESTED_MEGATRON, _targets

    assert _targets("any", TESTED_MEGATRON)
