"""Every entry point of the `dppo-megatron` command, one module per command."""
