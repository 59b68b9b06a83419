"""CI runs the README's test command verbatim (.ci/run)."""

from __future__ import annotations


def _readme_commands() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [block.split("```")[0].strip() for block in blocks]


def test_ci_runs_the_readme_test_command_verbatim():
    from pathlib import Path

    main_job, tests = _readme_commands()[:2]
    assert "qpo run --profile cpu-demo" in main_job and "pytest" in tests
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
