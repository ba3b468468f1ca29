"""The SGLang release the project supports: what the contract tests (tests/test_sglang_contract.py)
check against, and what the `gpu` extra pins. No imports, so that CI can make SGLang's test
environment before anything else is installed."""

SGLANG_RELEASE = "0.5.23"
