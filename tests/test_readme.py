"""The README's set-up commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands_installing_the_cpu_torch_first():
    commands = [c for c in readme_commands() if c.startswith("pip install")]
    assert len(commands) == 2, commands
    assert all(c.startswith("pip install torch==2.13.0 ") for c in commands)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
