"""Type-check the package with mypy, as configured in mypy.ini."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_package_clean() -> None:
    result = subprocess.run([sys.executable, '-m', 'mypy', 'mikkoo'], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
