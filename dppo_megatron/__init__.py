"""dppo-megatron: DPPO reinforcement learning on Megatron Core learners with SGLang rollouts."""

__version__ = "0.1.0"
