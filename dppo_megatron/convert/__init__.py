"""Hugging Face <-> Megatron Core for Qwen3 dense and Qwen3-MoE."""
