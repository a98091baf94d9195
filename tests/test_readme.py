"""The README's two set-up commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

from cockpit_cli.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_starts_with_the_two_commands() -> None:
    install_and_run, install_and_test = setup_commands()
    assert install_and_run.endswith("pip install -e . && cockpit run configs/quickstart.yaml")
    assert install_and_test.endswith("pip install -e '.[test]' && pytest")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.index("```bash") < text.index("##")  # before any section


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert setup_commands()[1] in ci_lines


def test_quickstart_config_is_valid() -> None:
    config = load_config(ROOT / "configs" / "quickstart.yaml")
    assert config.problem.name.startswith("mnist1d")
