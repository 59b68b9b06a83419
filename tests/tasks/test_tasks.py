"""Tasks: loaders on the real shared files, the embedded Rotten Tomatoes corpus, splits,
answer parsing and the label words' first tokens."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest

from qpo_ray.config import ConfigError, TaskConfig, load_config
from qpo_ray.tasks import TASKS, TaskDataError, get_task
from qpo_ray.tasks.math_word import last_number, normalize_number


def local(name: str, shared_data) -> TaskConfig:
    return TaskConfig(name=name, data_dir=str(shared_data / name))


def test_registry_has_the_papers_tasks_and_byo():
    assert set(TASKS) == {"rotten_tomatoes", "ag_news", "boolq", "imdb", "tweet_emotion",
                          "cosmos_qa", "hellaswag", "gsm8k", "svamp", "byo"}
    with pytest.raises(ValueError, match="task.name: unknown task 'nope'"):
        get_task(TaskConfig(name="nope"))


def test_tweet_emotion_reads_the_upstream_text_files(shared_data):
    task = get_task(local("tweet_emotion", shared_data))
    train, val, test = (task.load_split(s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (3257, 374, 1421)
    assert {e.label for e in train} == {0, 1, 2, 3}
    # mapping.txt: 0 anger, 1 joy, 2 optimism, 3 sadness; line 1 of test is label 3.
    assert task.label_words == ("anger", "joy", "optimism", "sadness")
    assert test[0].label == 3 and test[0].text.startswith("#Deppression is real.")
    assert task.format("Say the emotion.", test[0]).endswith("\nAnswer:")
    assert task.answer_text(test[0]) == " sadness"


def test_ag_news_single_file_is_carved_disjointly_and_logged(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="qpo_ray.tasks.files"):
        task = get_task(local("ag_news", shared_data))
        train, test = task.load_split("train"), task.load_split("test")
    assert "only labelled split" in caplog.text
    assert len(train) + len(test) == 7600 and len(test) == 1520
    assert not {e.id for e in train} & {e.id for e in test}
    # The carve seed is fixed: a second task instance gets the same test set.
    again = get_task(local("ag_news", shared_data)).load_split("test")
    assert [e.id for e in again] == [e.id for e in test]
    first = next(e for e in test + train if e.id == "test-1")
    assert first.label == 2 and first.text.startswith("Fears for T N pension after talks")
    assert task.label_words[first.label] == "Business"


def test_ag_news_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "test.csv").write_text('"3","title","text"\n"x","title","text"\n')
    task = get_task(TaskConfig(name="ag_news", data_dir=str(tmp_path)))
    with pytest.raises(TaskDataError, match=r"test\.csv: line 2: label 'x'"):
        task.load_split("test")


def test_gsm8k_reads_final_answers(shared_data):
    task = get_task(local("gsm8k", shared_data))
    train, test = task.load_split("train"), task.load_split("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].label == "72" and train[0].text.startswith("Natalia sold clips")
    assert task.mode == "generate"
    assert task.is_correct(train[0], task.parse("48 + 24 = 72 clips, so the answer is 72."))
    assert not task.is_correct(train[0], task.parse("I think 48."))


def test_cosmos_qa_lists_options_and_uses_letters(shared_data):
    task = get_task(local("cosmos_qa", shared_data))
    train, test = task.load_split("train"), task.load_split("test")
    assert len(train) + len(test) == 2985
    assert not {e.id for e in train} & {e.id for e in test}
    assert task.label_words == ("A", "B", "C", "D")
    assert task.continuations() == [" A", " B", " C", " D"]
    example = test[0]
    for letter in "ABCD":
        assert f"\n{letter}. " in example.text
    assert example.text.startswith("Context: ") and "\nQuestion: " in example.text


def test_rotten_tomatoes_loads_offline_from_the_embedded_corpus():
    task = get_task(TaskConfig(name="rotten_tomatoes"))
    train, test = task.load_split("train"), task.load_split("test")
    assert 12_700 <= len(train) + len(test) <= 12_808
    assert abs(len(test) / (len(train) + len(test)) - 0.2) < 0.01
    assert not {e.text for e in train} & {e.text for e in test}
    positives = sum(e.label for e in train) / len(train)
    assert 0.5 < positives < 0.65  # 7,403 fresh vs 5,405 rotten
    assert task.label_words == ("negative", "positive")


def test_splits_are_disjoint_reproducible_and_seeded(shared_data):
    task = get_task(local("tweet_emotion", shared_data))
    splits = task.splits(collection_fraction=0.1, seed=3)
    collected = {e.id for e in splits.collection}
    demos = {e.id for e in splits.demo_pool}
    assert len(collected) == round(0.1 * 3257) and not collected & demos
    assert len(collected) + len(demos) == 3257
    assert [e.id for e in task.splits(0.1, seed=3).collection] == \
        [e.id for e in splits.collection]
    assert {e.id for e in task.splits(0.1, seed=4).collection} != collected
    assert len(task.splits(0.1, seed=3, max_test=100).test) == 100
    # a dev split comes out of the collection's share, apart from everything else
    with_dev = task.splits(0.1, seed=3, dev_queries=50)
    dev = {e.id for e in with_dev.dev}
    assert len(dev) == 50 and len(with_dev.collection) == len(collected) - 50
    assert dev | {e.id for e in with_dev.collection} == collected
    assert not dev & {e.id for e in with_dev.collection} and not dev & demos
    assert not dev & {e.id for e in with_dev.test}
    with pytest.raises(ValueError, match="task.dev_queries"):
        task.splits(0.1, seed=3, dev_queries=len(collected))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="`datasets` is installed: the hub would be tried")
def test_hub_loading_without_datasets_says_what_to_do():
    with pytest.raises(TaskDataError, match=r"pip install datasets.*task\.data_dir"):
        get_task(TaskConfig(name="imdb")).load_split("train")


def test_missing_local_split_is_a_clear_error(tmp_path):
    with pytest.raises(TaskDataError, match=r"no 'train' data in .*train\.jsonl"):
        get_task(TaskConfig(name="gsm8k", data_dir=str(tmp_path))).load_split("train")


def test_numeric_answers_are_normalised():
    assert normalize_number("1,234.50") == "1234.5"
    assert normalize_number("$7") == "7" and normalize_number("27.0") == "27"
    assert normalize_number("seven") is None
    assert last_number("She has 3 apples and buys $1,200. Total: 1,203.") == "1203"
    assert last_number("no digits here") == ""


def test_label_words_have_distinct_first_tokens(tiny_model_dir):
    # The fast tokenizer file alone: importing transformers would dominate this test.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for name, cls in TASKS.items():
        if cls.mode != "labels" or name == "byo":
            continue
        first = [tokenizer.encode(" " + w, add_special_tokens=False).ids[0]
                 for w in cls.label_words]
        assert len(set(first)) == len(first), name


# -- bring your own task (YAML) ----------------------------------------------------------

def write_spec(tmp_path, body: str):
    spec = tmp_path / "task.yaml"
    spec.write_text(body)
    return TaskConfig(name="byo", spec_path=str(spec))


CSV_SPEC = """
name: mini_sentiment
type: classification
files:
  train: train.csv
  test: test.csv
text_columns: [title, body]
text_template: "{title}: {body}"
label_column: stars
label_words:
  1: negative
  5: positive
"""


def write_csvs(tmp_path):
    (tmp_path / "train.csv").write_text(
        "title,body,stars\nGreat,Loved it,5\nBad,Hated it,1\nFine,Quite good,5\n")
    (tmp_path / "test.csv").write_text("title,body,stars\nMeh,Boring,1\n")


def test_byo_classification_from_csv(tmp_path):
    write_csvs(tmp_path)
    task = get_task(write_spec(tmp_path, CSV_SPEC))
    train = task.load_split("train")
    assert task.name == "mini_sentiment" and task.mode == "labels"
    assert task.label_words == ("negative", "positive")
    assert [(e.text, e.label) for e in train] == [
        ("Great: Loved it", 1), ("Bad: Hated it", 0), ("Fine: Quite good", 1)]
    assert task.load_split("test")[0].label == 0
    assert task.format("Positive or negative?", train[0]) == \
        "Positive or negative?\n\nInput: Great: Loved it\nAnswer:"
    splits = task.splits(collection_fraction=0.34, seed=0)
    assert len(splits.collection) == 1 and len(splits.demo_pool) == 2


def test_byo_generation_from_jsonl_with_one_file(tmp_path):
    rows = [f'{{"q": "What is {i} + {i}?", "a": "{2 * i}"}}' for i in range(10)]
    (tmp_path / "all.jsonl").write_text("\n".join(rows) + "\n")
    task = get_task(write_spec(tmp_path, """
name: doubling
type: generation
files: {train: all.jsonl}
text_column: q
label_column: a
answer_regex: "answer is (-?\\\\d+)"
"""))
    train, test = task.load_split("train"), task.load_split("test")
    assert len(train) == 8 and len(test) == 2  # carved 80/20 from the single file
    assert not {e.id for e in train} & {e.id for e in test}
    example = next(e for e in train + test if e.text == "What is 3 + 3?")
    assert example.label == "6" and task.mode == "generate"
    assert task.parse("3 + 3: the answer is 6, not 7") == "6"
    assert task.is_correct(example, task.parse("so the answer is 6."))
    assert not task.is_correct(example, task.parse("6? no, the answer is 7"))


def test_byo_missing_column_names_yaml_file_and_key(tmp_path):
    write_csvs(tmp_path)
    task = get_task(write_spec(tmp_path, CSV_SPEC.replace("label_column: stars",
                                                          "label_column: rating")))
    with pytest.raises(TaskDataError) as info:
        task.load_split("train")
    message = str(info.value)
    assert "train.csv" in message and "'rating'" in message
    assert "task.yaml key 'label_column'" in message


def test_byo_missing_label_word_names_row_and_key(tmp_path):
    write_csvs(tmp_path)
    (tmp_path / "train.csv").write_text("title,body,stars\nA,b,5\nC,d,3\n")
    task = get_task(write_spec(tmp_path, CSV_SPEC))
    with pytest.raises(TaskDataError,
                       match=r"train\.csv: row 2: label '3' has no entry under key "
                             r"'label_words' in .*task\.yaml"):
        task.load_split("train")


def test_byo_spec_errors_name_file_and_key(tmp_path):
    write_csvs(tmp_path)
    with pytest.raises(TaskDataError, match=r"task\.yaml: key 'label_words'"):
        get_task(write_spec(tmp_path, CSV_SPEC.replace("  1: negative\n", "")))
    with pytest.raises(TaskDataError, match=r"task\.yaml: key 'files\.test': .*nope\.csv"):
        get_task(write_spec(tmp_path, CSV_SPEC.replace("test.csv", "nope.csv")))
    with pytest.raises(TaskDataError, match=r"task\.yaml: line 3: not valid YAML"):
        get_task(write_spec(tmp_path, "name: x\ntype: [unclosed\nfiles: {train: a}\n"))
    with pytest.raises(TaskDataError, match=r"key 'label_words\.1': True is not a word"):
        get_task(write_spec(tmp_path, CSV_SPEC.replace("1: negative", "1: yes")))
    with pytest.raises(TaskDataError, match=r"task\.yaml: key 'text_template'"):
        get_task(write_spec(tmp_path, CSV_SPEC.replace("{body}", "{summary}")))


def test_byo_bad_rows_name_the_data_file_and_row(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "y": 1}\n{"text": "  ", "y": 0}\n')
    spec = ("name: rows\ntype: classification\nfiles: {train: train.jsonl}\n"
            "text_column: text\nlabel_column: y\nlabel_words: {0: 'no', 1: 'yes'}\n")
    with pytest.raises(TaskDataError, match=r"train\.jsonl: row 2: empty text"):
        get_task(write_spec(tmp_path, spec)).load_split("train")
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "y": 1}\n{"text": "ok"}\n')
    with pytest.raises(TaskDataError, match=r"train\.jsonl: row 2: no column 'y'"):
        get_task(write_spec(tmp_path, spec)).load_split("train")
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "y": 1}\n{"text": "ok", "y": 1\n')
    with pytest.raises(TaskDataError, match=r"train\.jsonl: line 2: not valid JSON"):
        get_task(write_spec(tmp_path, spec)).load_split("train")


def _tiny(tmp_path, *overrides: str):
    return load_config("cpu-demo", [f"workdir={tmp_path / 'run'}", "target.backend=transformers",
                                    "task.dev_queries=4", *overrides])


def test_label_words_must_be_distinct_token_sequences_of_the_target(tiny_model_dir):
    from qpo_ray.backends import check_continuations

    target = load_config("cpu-demo", [f"target.model={tiny_model_dir}"]).target
    check_continuations(target, [" negative", " positive"], "label_words of t.yaml")
    with pytest.raises(ConfigError, match=r"label_words of t\.yaml: '' encodes to no tokens"):
        check_continuations(target, [" negative", " "], "label_words of t.yaml")
    with pytest.raises(ConfigError, match=r"'positive' and 'positive' encode to the same"):
        check_continuations(target, [" positive", "positive"], "label_words of t.yaml")


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


@pytest.mark.parametrize("profile", ["v100", "cluster"])
def test_gpu_profiles_without_datasets_stop_before_work_naming_task_data_dir(
        monkeypatch, tmp_path, profile):
    """The v100/cluster profiles read ag_news from the hub through `datasets`, which is
    not installed by default: the pre-run checks say how to install it or where to put
    the upstream files."""
    from qpo_ray.config import load_config
    from qpo_ray.run.loop import check_before_work
    from qpo_ray.tasks.files import TaskDataError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = load_config(profile, [f"workdir={tmp_path / 'run'}"])
    with pytest.raises(TaskDataError) as err:
        check_before_work(cfg)
    message = str(err.value)
    assert message.startswith("task ag_news: ")
    assert "pip install datasets" in message and "task.data_dir" in message
    assert not (tmp_path / "run").exists()  # nothing started
