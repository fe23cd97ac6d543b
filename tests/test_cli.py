"""The command line: ``python -m nbparrot demo`` (the README's first command) runs a whole batch on the bundled
server; no command prints the help; ``--version``; the server's flags."""

from __future__ import annotations

import argparse
import subprocess
import sys

import nbparrot
from nbparrot.server.cli import add_arguments, config_from_args


def test_demo_runs_a_batch_and_prints_results_tokens_and_cost():
    proc = subprocess.run([sys.executable, "-m", "nbparrot", "demo", "--rows", "120"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rows answered: 120/120" in proc.stdout
    assert "tokens:" in proc.stdout and "cost at gpt-4o-mini list prices: $" in proc.stdout
    assert "sk-demo-key" not in proc.stdout + proc.stderr


def test_demo_fits_80_columns_shows_its_template_and_says_the_answers_are_placeholders():
    proc = subprocess.run([sys.executable, "-m", "nbparrot", "demo", "--rows", "30"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "Classify the sentiment of this {product} review" in proc.stdout
    assert "placeholder text" in proc.stdout


def test_no_command_prints_the_help_and_version_is_there():
    bare = subprocess.run([sys.executable, "-m", "nbparrot"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and "usage: python -m nbparrot" in bare.stdout
    assert "demo" in bare.stdout and "serve" in bare.stdout
    version = subprocess.run([sys.executable, "-m", "nbparrot", "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"nbparrot {nbparrot.__version__}"


def test_the_reset_probability_flag_is_p_reset_and_the_old_name_still_works(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--p-reset" in parser.format_help() and "--preset" not in parser.format_help()
    assert config_from_args(parser.parse_args(["--p-reset", "0.2"])).p_reset == 0.2
    assert config_from_args(parser.parse_args(["--preset", "0.3"])).p_reset == 0.3
    assert "--preset is deprecated, use --p-reset" in capsys.readouterr().err
