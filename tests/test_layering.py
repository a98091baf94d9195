"""Everything after the run directory starts without torch (DESIGN: storage, display, diagnosis, compare)."""

from __future__ import annotations

import subprocess
import sys

TORCH_FREE = [
    "cockpit_cli.cli",
    "cockpit_cli.config",
    "cockpit_cli.launch",
    "cockpit_cli.storage.reader",
    "cockpit_cli.storage.writer",
    "cockpit_cli.display.dashboard",
    "cockpit_cli.display.watch",
    "cockpit_cli.diagnosis",
    "cockpit_cli.compare",
    "cockpit_cli.compare_render",
    "cockpit_cli.report",
]


def test_reading_side_never_imports_torch() -> None:
    code = "import sys\n" + "".join(f"import {name}\n" for name in TORCH_FREE) + "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
