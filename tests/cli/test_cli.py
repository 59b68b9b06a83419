"""The `qpo` command line: its subcommands, and bad overrides named by their key."""

from __future__ import annotations
import subprocess
import sys


def test_cli_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "qpo_ray.cli", "--help"],
                         check=True, capture_output=True, text=True).stdout
    for command in ("run", "dataset", "train", "augment", "evaluate", "serve", "setup"):
        assert command in out


def test_cli_reports_a_bad_override_with_its_key():
    proc = subprocess.run(
        [sys.executable, "-m", "qpo_ray.cli", "run", "--profile", "cpu-demo",
         "--set", "loop.num_loopz=2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "loop.num_loopz" in proc.stderr
