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


# -- the CLI that tells before it spends (in-process: `main` is the `qpo` entry point) --

import logging  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from qpo_ray.cli import build_parser, main  # noqa: E402
from qpo_ray.common.console import log, set_verbosity  # noqa: E402
from qpo_ray.common.progress import Progress  # noqa: E402
from qpo_ray.config import config_from_dict, load_config  # noqa: E402


def test_version_and_the_default_profile_is_said(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("qpo-ray 0.")
    assert main(["config", "show", "--set", "loop.num_loops=3"]) == 0
    out, err = capsys.readouterr()
    assert "no --profile given: using cpu-demo" in err
    shown = config_from_dict(yaml.safe_load(out))  # the YAML is a whole, valid config
    assert shown.loop.num_loops == 3 and shown == load_config("cpu-demo", ["loop.num_loops=3"])


def test_serve_subcommands_keep_the_parents_profile():
    parser = build_parser()
    args = parser.parse_args(["serve", "--profile", "cluster", "--set", "seed=1", "report"])
    assert args.profile == "cluster" and args.func.__name__ == "cmd_serve_report"
    args = parser.parse_args(["serve", "--set", "seed=1", "report", "--profile", "v100",
                              "--set", "seed=2"])
    assert args.profile == "v100" and args.overrides + args.nested_overrides == ["seed=1",
                                                                                 "seed=2"]


def test_quiet_and_verbose_set_the_qpo_logger(capsys):
    try:
        set_verbosity(-1)
        log.info("stage x ...")
        progress = Progress("train_1", 2, "steps", every_s=0)
        progress.update(2)
        progress.close()
        assert capsys.readouterr().out == ""
        set_verbosity(0)
        log.info("stage x ...")
        log.debug("hidden")
        assert capsys.readouterr().out == "[qpo] stage x ...\n"
        set_verbosity(1)
        assert log.isEnabledFor(logging.DEBUG)
    finally:
        set_verbosity(0)


@pytest.mark.parametrize("key", ["target.model", "policy.backbone"])
def test_a_hub_typo_ends_before_work_naming_the_key(capsys, key):
    # HF_HUB_OFFLINE=1 here (tests/conftest.py); online, the hub answers "not a repository".
    extra = ["--set", "target.backend=transformers"] if key == "target.model" else []
    assert main(["check", "--profile", "cpu-demo", *extra, "--set",
                 f"{key}=nobody/typo-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"qpo: error: {key}: 'nobody/typo-model' is neither a local")


def test_check_prints_the_cpu_demo_plan(capsys):
    assert main(["check", "--profile", "cpu-demo"]) == 0
    out = capsys.readouterr().out
    # 35 builtin prompts x 32 shared queries + 8 wide prompts x 300 queries
    assert "step0         3,520" in out and "augment_1        96" in out
    assert "train_1           0            0      100" in out
    # test: mbr calibration 8 x 200 dev, 2 loops x 2 decodings x 200 dev, best_single_dev
    # 35 x 200 dev, 5 methods that call the target x 200 test (probe, majority do not).
    test_row = next(line for line in out.splitlines() if line.startswith("test "))
    assert test_row.split()[1] == "10,400"
    assert float(test_row.split()[-1].replace(",", "")) > 0  # engine-s from this machine


def test_check_guesses_no_engine_seconds_for_an_engine_it_has_no_fit_for(capsys):
    # The share of the matmul probe is fitted for vLLM-CPU only: engines placed on GPUs
    # get pairs and tokens counted, and "-" rather than a CPU-fitted guess.
    assert main(["check", "--profile", "cpu-demo",
                 "--set", "evaluation.num_gpus_per_actor=1"]) == 0
    out = capsys.readouterr().out
    test_row = next(line for line in out.splitlines() if line.startswith("test "))
    assert test_row.split()[1] == "10,400" and test_row.split()[-1] == "-"


def test_init_skeleton_and_a_1000_row_task_pass_check_with_no_size_tuning(tmp_path, capsys):
    """A bring-your-own task of 1,000 labelled rows and 10 prompts, `extends: cpu-demo`:
    `qpo init`'s files with the data replaced, nothing else changed."""
    assert main(["init", str(tmp_path / "mine")]) == 0
    profile = tmp_path / "mine" / "profile.yaml"
    assert "extends: cpu-demo" in profile.read_text()
    assert main(["check", "--profile", str(profile)]) == 0  # the skeleton as written
    rows = ["text,label"] + [f"\"Item {i} {'is great' if i % 3 else 'broke'}\",{int(i % 3 > 0)}"
                             for i in range(1000)]
    (tmp_path / "mine" / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    capsys.readouterr()
    assert main(["check", "--profile", str(profile)]) == 0
    out = capsys.readouterr().out
    assert "[qpo] sizes: task 'mine' has 800 train rows; task.collection_fraction 0.1 -> " \
           "0.665" in out
    assert "step0         2,720" in out  # 10 prompts x 32 + 8 x 300: cpu-demo's sizes
    assert main(["init", str(tmp_path / "mine")]) == 2  # exists: refused, not overwritten
    assert "exists (--force overwrites" in capsys.readouterr().err
