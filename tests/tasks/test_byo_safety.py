"""A bring-your-own task spec from someone else reads only the files beside it and
cannot hang scoring or fill the memory: paths leaving its folder (absolute, `..`, a
symlink out), a backtracking-prone or overlong answer regex, and oversized or nested
format fields are refused at load, each error naming the spec file and its key."""

from __future__ import annotations

import re
import time

import pytest

from qpo_ray.config import TaskConfig
from qpo_ray.tasks import get_task
from qpo_ray.tasks.byo import SpecError

ROWS = "title,body,stars\nGreat,Loved it,5\nBad,Hated it,1\nFine,Quite good,5\n"


def _spec(folder, files: str, extra: str = "", **cfg) -> TaskConfig:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "task.yaml"
    spec.write_text(f"name: mini\ntype: classification\nfiles: {files}\n"
                    "text_columns: [title, body]\nlabel_column: stars\n"
                    f"label_words: {{1: negative, 5: positive}}\n{extra}")
    return TaskConfig(name="byo", spec_path=str(spec), **cfg)


def _rows(cfg: TaskConfig) -> list[str]:
    """Every example's text (one file: train and test are carved from it)."""
    task = get_task(cfg)
    return [e.text for e in task.load_split("train") + task.load_split("test")]


def _refused(cfg: TaskConfig, key: str, *phrases: str) -> str:
    with pytest.raises(SpecError) as info:
        get_task(cfg)
    message = str(info.value)
    assert message.startswith(f"{cfg.spec_path}: key '{key}'"), message
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_files_stay_in_the_specs_folder_unless_the_user_opts_out(tmp_path):
    secret = tmp_path / "private.csv"
    secret.write_text(ROWS)
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "train.csv").write_text(ROWS)
    assert len(_rows(_spec(folder, "{train: train.csv}"))) == 3

    _refused(_spec(folder, "{train: ../private.csv}"), "files.train", "'..' leaves the spec's "
             "folder", "task.spec_outside_files: true")
    _refused(_spec(folder, f"{{test: {secret}}}"), "files.test", "an absolute path",
             "task.spec_outside_files: true")
    (folder / "link.csv").symlink_to(secret)
    _refused(_spec(folder, "{train: link.csv}"), "files.train", "a symlink to",
             str(secret), "outside the spec's folder")
    (folder / "data").symlink_to(tmp_path)  # a folder link leading out
    _refused(_spec(folder, "{train: data/private.csv}"), "files.train", "outside")
    _refused(_spec(folder, "{validation: {text: ../a.txt, labels: b.txt}}"),
             "files.validation.text", "'..'")

    (folder / "inner").mkdir()
    (folder / "inner" / "rows.csv").write_text(ROWS)
    (folder / "alias.csv").symlink_to(folder / "inner" / "rows.csv")  # stays inside: fine
    assert len(_rows(_spec(folder, "{train: alias.csv}"))) == 3
    # The user's own config, not the spec, lets a path out.
    for files in (f"{{train: {secret}}}", "{train: ../private.csv}", "{train: link.csv}"):
        assert len(_rows(_spec(folder, files, spec_outside_files=True))) == 3


def test_answer_regex_is_bounded(tmp_path):
    def generation(regex: str) -> TaskConfig:
        folder = tmp_path / "gen"
        folder.mkdir(exist_ok=True)
        (folder / "all.jsonl").write_text("".join(
            f'{{"q": "What is {i} + {i}?", "a": "{2 * i}"}}\n' for i in range(10)))
        spec = folder / "task.yaml"
        spec.write_text("name: doubling\ntype: generation\nfiles: {train: all.jsonl}\n"
                        f"text_column: q\nlabel_column: a\nanswer_regex: '{regex}'\n")
        return TaskConfig(name="byo", spec_path=str(spec))

    evil = r"(\d|\d\d)+$"
    # What the refusal prevents: `re` needs ~0.1 s for 26 digits here, x1.6 per more digit.
    start = time.perf_counter()
    assert re.search(evil, "1" * 26 + "x") is None
    assert time.perf_counter() - start > 0.05
    _refused(generation(evil), "answer_regex", "an alternation inside a repeated group",
             "backtrack exponentially", "possessive")
    _refused(generation(r"(\d+\s?)+$"), "answer_regex", "a repetition inside a repeated group")
    _refused(generation("x" * 201), "answer_regex", "201 characters, more than 200")
    _refused(generation("(unclosed"), "answer_regex", "not a valid regex")
    # The safe forms of the same ideas load and parse.
    for ok in (r"(?:\d|\d\d)++$", r"answer is (-?\d+)", r"-?\d[\d,]*(?:\.\d+)?", r"(?>\d+,)*\d+"):
        task = get_task(generation(ok))
        assert task.parse("so the answer is 12") in ("12", "2")


@pytest.mark.parametrize("template, phrase", [
    ("{title:>100000000}", "a width or precision above 1000"),
    ("{title:.5000}", "a width or precision above 1000"),
    ("{title:{body}}", "nested fields are not allowed"),
    ("{}: {body}", "not in text_columns"),
    ("{title.__class__}", "not in text_columns"),
    ("{title}: {body", "not a format string"),
    ("{title:d}", "does not format text values"),
])
def test_text_template_is_bounded(tmp_path, template, phrase):
    (tmp_path / "train.csv").write_text(ROWS)
    _refused(_spec(tmp_path, "{train: train.csv}", f"text_template: '{template}'\n"),
             "text_template", phrase)


def test_a_modest_template_width_still_formats(tmp_path):
    (tmp_path / "train.csv").write_text(ROWS)
    texts = _rows(_spec(tmp_path, "{train: train.csv}", "text_template: '{title:<8}|{body}'\n"))
    assert "Great   |Loved it" in texts and len(texts) == 3
