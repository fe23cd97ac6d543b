"""The README's first command: ``python -m nbparrot demo`` runs a whole batch on the bundled server."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_a_batch_and_prints_results_tokens_and_cost():
    proc = subprocess.run([sys.executable, "-m", "nbparrot", "demo", "--rows", "120"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rows answered: 120/120" in proc.stdout
    assert "tokens:" in proc.stdout and "cost at gpt-4o-mini list prices: $" in proc.stdout
    assert "sk-demo-key" not in proc.stdout + proc.stderr
