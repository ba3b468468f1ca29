"""The model description both wings use: the Qwen3 / Qwen3-MoE architecture, the one
Hugging Face <-> Megatron tensor table, safetensors I/O, the known Qwen3 configs and the
learner's parallel layout. Imports no Megatron, no HTTP, no learner/ and no rollout/."""
