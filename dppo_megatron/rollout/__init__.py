"""Rollouts: the SGLang protocol, the client, server management, the embedded engine, weight
sync. Knows no Megatron."""
