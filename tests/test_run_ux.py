"""A run a user can follow (issue #16), the parts that need no QPO run: what is checked
before any work, prompts named by index or text, which `--resume --set` changes are
refused, progress lines on a terminal and off it, the text + label file layout of
bring-your-own tasks, and the reward distribution beside the accuracy plot. The parts
that need a run (a `qpo run` subprocess) are in test_loop.py and test_config.py."""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest

from qpo_ray.config import ConfigError, PromptsConfig, TaskConfig, load_config
from qpo_ray.progress import Progress
from qpo_ray.prompts import PromptCollectionError, load_collection, manual_prompt, resolve_prompt
from qpo_ray.resume import invalidated
from qpo_ray.tasks import TaskDataError, get_task


def _tiny(tmp_path, *overrides: str):
    return load_config("cpu-demo", [f"workdir={tmp_path / 'run'}", "target.backend=transformers",
                                    "task.dev_queries=4", *overrides])


def test_a_collection_without_sources_gets_an_announced_manual_default(tmp_path, capsys):
    from qpo_ray.loop import check_before_work

    path = tmp_path / "mine.txt"
    path.write_text("Positive or negative?\nSay positive or negative.\nVerdict: positive/negative\n")
    check_before_work(_tiny(tmp_path, f"prompts.source={path}"))
    out = capsys.readouterr().out
    assert "no prompt with source 'manual'" in out and "prompt 0" in out
    assert "Positive or negative?" in out and "prompts.manual_prompt_id" in out


def test_a_prompt_is_named_by_id_index_or_text():
    records = load_collection(PromptsConfig(), "rotten_tomatoes")
    third = records[2]
    for ref in (third.id, 2, "2", third.text, f"  {third.text} "):
        assert manual_prompt(records, PromptsConfig(manual_prompt_id=ref)) == third
    with pytest.raises(PromptCollectionError, match=r"prompts\.manual_prompt_id: index 99 .*"
                                                    r"0: p-[0-9a-f]{12}"):
        resolve_prompt(records, 99, "prompts.manual_prompt_id")
    # an index given on the command line arrives as an int (YAML): the config takes it
    assert load_config("cpu-demo", ["prompts.manual_prompt_id=2"]).prompts.manual_prompt_id == 2


def test_label_words_must_be_distinct_token_sequences_of_the_target(tiny_model_dir):
    from qpo_ray.backends import check_continuations

    target = load_config("cpu-demo", [f"target.model={tiny_model_dir}"]).target
    check_continuations(target, [" negative", " positive"], "label_words of t.yaml")
    with pytest.raises(ConfigError, match=r"label_words of t\.yaml: '' encodes to no tokens"):
        check_continuations(target, [" negative", " "], "label_words of t.yaml")
    with pytest.raises(ConfigError, match=r"'positive' and 'positive' encode to the same"):
        check_continuations(target, [" positive", "positive"], "label_words of t.yaml")


def test_resume_changes_invalidate_their_stage_and_every_later_one():
    old = load_config("cpu-demo")  # two loops
    new = load_config("cpu-demo", ["loop.num_loops=1"])
    assert invalidated("evaluation.num_actors", old, old) == []
    assert invalidated("serve.port", old, old) == []
    assert invalidated("tracking.uri", old, old)[0] == "step0"  # its MLflow runs live there
    assert invalidated("prompts.manual_prompt_id", old, old) == ["test"]
    assert invalidated("test.decoding", old, old) == ["test"]
    assert invalidated("dataset.expert_fraction", old, old)[:2] == ["filter", "train_1"]
    assert invalidated("training.lr_later_loops", old, old)[0] == "train_1"
    assert invalidated("loop.top_k", old, old)[0] == "augment_1"
    assert invalidated("target.model", old, old)[0] == "step0"
    assert invalidated("seed", old, old)[0] == "step0"
    assert invalidated("loop.num_loops", old, new) == ["augment_1", "train_2", "test"]


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    log = io.StringIO()
    progress = Progress("train_1", 4, "steps", stream=log, every_s=0)
    for step in range(1, 5):
        progress.update(step, loss=2.5 / step, **{"samples/s": 8.0})
    progress.close()  # the last update already said it all: no second line
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in log.getvalue()
    assert re.fullmatch(r"\[qpo\] train_1: 1/4 steps, loss 2\.5, samples/s 8, ETA \d+ s",
                        lines[0])
    assert lines[3].startswith("[qpo] train_1: 4/4 steps, loss 0.625")
    # a phase shorter than `every_s`: only its last line
    quiet = io.StringIO()
    progress = Progress("augment_1: generating", 3, "prompts", stream=quiet, every_s=3600)
    for done in (1, 2, 3):
        progress.update(done)
    progress.close()
    assert re.fullmatch(r"\[qpo\] augment_1: generating: 3/3 prompts, \d+ s\n",
                        quiet.getvalue())

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = Progress("step0: scoring", 10, "pairs", stream=tty, every_s=3600)
    bar.update(5)
    bar.update(10)
    bar.close()
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("\n")
    assert "[############------------] 5/10 pairs" in tty.getvalue()


LINES_SPEC = """
name: lines
type: classification
files:
  train: {text: train.txt, labels: train_labels.txt}
label_words: {neg: negative, pos: positive}
"""


def test_byo_text_file_with_a_parallel_label_file(tmp_path):
    (tmp_path / "task.yaml").write_text(LINES_SPEC)
    (tmp_path / "train.txt").write_text("".join(f"review {i}\n" for i in range(10)))
    (tmp_path / "train_labels.txt").write_text("pos\nneg\n" * 5 + "\n")
    task = get_task(TaskConfig(name="byo", spec_path=str(tmp_path / "task.yaml")))
    examples = task.load_split("train") + task.load_split("test")
    assert sorted((e.text, e.label) for e in examples) == sorted(
        (f"review {i}", 1 - i % 2) for i in range(10))

    (tmp_path / "train_labels.txt").write_text("pos\nneg\nmaybe\n" + "pos\n" * 7)
    with pytest.raises(TaskDataError, match=r"train_labels\.txt: line 3: label 'maybe' has no "
                                            r"entry under key 'label_words'"):
        get_task(TaskConfig(name="byo", spec_path=str(tmp_path / "task.yaml"))).load_split("train")
    (tmp_path / "train_labels.txt").write_text("pos\n" * 9)
    with pytest.raises(TaskDataError, match=r"train_labels\.txt: line 10: missing \(.*train\.txt "
                                            r"has 10 lines"):
        get_task(TaskConfig(name="byo", spec_path=str(tmp_path / "task.yaml"))).load_split("train")
    (tmp_path / "train.txt").write_text("a\n\nc\n" + "x\n" * 6)
    with pytest.raises(TaskDataError, match=r"train\.txt: line 2: empty text"):
        get_task(TaskConfig(name="byo", spec_path=str(tmp_path / "task.yaml"))).load_split("train")


def test_accuracy_plot_has_the_reward_distribution_per_loop_beside_it():
    from qpo_ray.plots import accuracy_per_loop

    results = pd.DataFrame({
        "shots": [0] * 4, "method": ["qpo_loop1", "qpo_loop2", "qpo", "manual"],
        "accuracy": [0.6, 0.7, 0.7, 0.65], "ci_low": [0.5, 0.6, 0.6, 0.55],
        "ci_high": [0.7, 0.8, 0.8, 0.75]})
    rewards = {"0 (step 0)": [10.0, 50.0, 90.0], "1 (policy 1)": [40.0, 60.0, 80.0, 95.0]}
    fig = accuracy_per_loop(results, 0, rewards)
    left, right = fig.axes
    assert left.get_xticks().tolist() == [1, 2]
    assert [t.get_text() for t in right.get_xticklabels()] == ["0 (step 0)\n(n=3)",
                                                               "1 (policy 1)\n(n=4)"]
    assert len(accuracy_per_loop(results, 0).axes) == 1
