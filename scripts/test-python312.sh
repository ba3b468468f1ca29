#!/usr/bin/env bash
# The suite on Python 3.12 with the newest megatron-core the project admits (0.19.x), beside
# CI's Python 3.11 + megatron-core 0.16.1: the CPU bridge patches Megatron internals, so both
# ends of the supported range are run. Python 3.12 wheels of torch on PyPI are CUDA builds;
# they run on the CPU. Extra arguments go to pytest.
#   scripts/test-python312.sh            # the whole suite
#   scripts/test-python312.sh -x tests/test_learner_parity.py
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON312:-python3.12}"
venv="$(mktemp -d)/venv312"
"$python" -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
pip install --quiet torch -e ".[test]"
python - <<'PY'
import sys
from importlib.metadata import version
print(f"Python {sys.version.split()[0]}, megatron-core {version('megatron-core')}, torch {version('torch')}, "
      f"transformers {version('transformers')}")
PY
python -m pytest -q "$@"
