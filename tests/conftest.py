"""Suite-wide hooks."""

from tests.sglang_contract import start_building


def pytest_collection_finish(session) -> None:
    # SGLang's environment for the contract tests takes minutes to make on a fresh machine:
    # start it now, so that it is made while the tests before them run.
    if any(item.module.__name__.endswith("test_sglang_contract") for item in session.items):
        start_building()
