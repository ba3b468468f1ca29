"""Math reward with math-verify: the last \\boxed{} answer (or a final expression) of the
response, checked for mathematical equivalence with the reference. 1 if equivalent, else 0."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class MathReward:
    def __init__(self, *, timeout: float = 5.0):
        try:
            from math_verify import ExprExtractionConfig, LatexExtractionConfig
        except ImportError as error:  # a declared dependency: only a broken install gets here
            raise RuntimeError("the math reward needs math-verify: pip install 'math-verify[antlr4_13_2]'") from error
        self.timeout = timeout
        self.extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
        self.timeouts = 0

    def __call__(self, response: str, answer: str) -> float:
        from math_verify import parse, verify

        # math-verify's own time limits use SIGALRM, which exists only on the main thread.
        seconds = max(1, round(self.timeout)) if threading.current_thread() is threading.main_thread() else None
        try:
            gold = parse(answer if "\\boxed" in answer else f"\\boxed{{{answer}}}", parsing_timeout=seconds)
            predicted = parse(response, extraction_config=self.extraction, parsing_timeout=seconds)
            if not gold or not predicted:
                return 0.0
            return 1.0 if verify(gold, predicted, timeout_seconds=seconds) else 0.0
        except Exception as error:  # noqa: BLE001 - a response that breaks the parser earns nothing
            if "timeout" in type(error).__name__.lower() or "timed out" in str(error).lower():
                self.timeouts += 1
            log.debug("math reward failed on %r: %s", response[-200:], error)
            return 0.0
