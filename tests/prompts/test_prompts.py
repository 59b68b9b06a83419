"""Prompt collections: the builtin ones, the InstructEval layout, .txt/.jsonl files, the
manual baseline and errors that name the file and line."""

from __future__ import annotations

import pytest

from qpo_ray.config import PromptsConfig, load_config
from qpo_ray.prompts import (BUILTIN_DIR, PromptCollectionError, load_collection, manual_prompt,
                             manual_prompt_note, prompt_id, resolve_prompt)
from qpo_ray.tasks import TASKS


def test_builtin_rotten_tomatoes_collection():
    records = load_collection(PromptsConfig(), "rotten_tomatoes")
    assert len(records) >= 30
    sources = {r.source for r in records}
    assert {"manual", "terse", "role_play", "step_by_step", "low_perplexity"} <= sources
    # The target answers with a label word right after the prompt: every prompt says which.
    for record in records:
        assert "positive" in record.text.lower() and "negative" in record.text.lower(), record
    assert len({r.id for r in records}) == len(records)
    assert all(r.id == prompt_id(r.text) for r in records)
    manual = manual_prompt(records, PromptsConfig())
    assert manual.source == "manual" and manual == next(r for r in records
                                                        if r.source == "manual")


def test_every_builtin_task_ships_a_collection_with_a_manual_prompt():
    for name in TASKS:
        if name == "byo":
            continue
        records = load_collection(PromptsConfig(), name)
        assert manual_prompt(records, PromptsConfig()).source == "manual", name
    with pytest.raises(PromptCollectionError, match="no builtin collection for task 'byo'"):
        load_collection(PromptsConfig(), "byo")


def test_ids_are_stable_across_loads_and_sources(tmp_path):
    first = load_collection(PromptsConfig(), "rotten_tomatoes")
    again = load_collection(PromptsConfig(), "rotten_tomatoes")
    assert [r.id for r in first] == [r.id for r in again]
    text_file = tmp_path / "mine.txt"
    text_file.write_text(f"\n{first[3].text}\nA brand new prompt: positive or negative?\n\n")
    mine = load_collection(PromptsConfig(source=str(text_file)), "rotten_tomatoes")
    assert [r.source for r in mine] == ["custom", "custom"]
    assert mine[0].id == first[3].id  # same text, same id, whatever the file


def test_instructeval_directory_keeps_methods(shared_data, caplog, monkeypatch):
    root = shared_data / "instructeval_prompts"
    records = load_collection(PromptsConfig(source=str(root)), "tweet_emotion")
    sources = {r.source for r in records}
    assert {"manual", "ape", "rlprompt", "chat_gpt_prompts",
            "low_perplexity_prompts/llama7b"} <= sources
    manual = [r.text for r in records if r.source == "manual"]
    assert len(manual) == 5 and manual[0].startswith("To get full credit in this exam")
    assert manual_prompt(records, PromptsConfig()).text == manual[0]

    picked = load_collection(PromptsConfig(source=str(root),
                                           methods=["manual", "low_perplexity_prompts"]),
                             "tweet_emotion")
    assert {r.source.split("/")[0] for r in picked} == {"manual", "low_perplexity_prompts"}
    assert len({r.source for r in picked}) > 2  # several low-perplexity models

    # `no_instruction` holds one empty prompt: left out before any work, with a warning
    # (scored in Step 0, it used to fail the first training stage minutes later)
    monkeypatch.setattr("qpo_ray.prompts._WARNED_EMPTY", set())  # said once per process
    with caplog.at_level("WARNING", logger="qpo_ray.prompts"):
        every = load_collection(PromptsConfig(source=str(root)), "ag_news")
    assert every and all(r.text.strip() for r in every)
    assert "empty prompts left out" in caplog.text and "no_instruction" in caplog.text
    with pytest.raises(PromptCollectionError, match="no prompts for task 'ag_news'"):
        load_collection(PromptsConfig(source=str(root), methods=["no_instruction"]), "ag_news")

    with pytest.raises(PromptCollectionError, match=r"prompts\.methods: 'apex'"):
        load_collection(PromptsConfig(source=str(root), methods=["apex"]), "tweet_emotion")
    with pytest.raises(PromptCollectionError, match=r"no <method>/rotten_tomatoes\.yaml"):
        load_collection(PromptsConfig(source=str(root)), "rotten_tomatoes")


def test_jsonl_collection_and_manual_prompt_id(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "Rate it.", "source": "terse"}\n'
                    '{"text": "Is the review positive or negative?", "source": "manual"}\n'
                    '{"text": "Rate it.", "source": "rewrite"}\n')
    records = load_collection(PromptsConfig(source=str(path)), "rotten_tomatoes")
    assert [(r.text, r.source) for r in records] == [
        ("Rate it.", "terse"), ("Is the review positive or negative?", "manual")]
    chosen = manual_prompt(records, PromptsConfig(manual_prompt_id=records[0].id))
    assert chosen.text == "Rate it."
    with pytest.raises(PromptCollectionError, match=r"prompts\.manual_prompt_id: 'p-x'"):
        manual_prompt(records, PromptsConfig(manual_prompt_id="p-x"))
    # Without a "manual" prompt the first prompt is the baseline, announced as such.
    only_terse = load_collection(PromptsConfig(source=str(path), methods=["terse"]), "x")
    assert manual_prompt(only_terse, PromptsConfig()) == only_terse[0]
    assert "prompt 0" in manual_prompt_note(only_terse, PromptsConfig())
    assert manual_prompt_note(records, PromptsConfig()) is None


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(PromptCollectionError, match=r"bad\.jsonl: line 3: not valid JSON"):
        load_collection(PromptsConfig(source=str(path)), "rotten_tomatoes")
    path.write_text('{"text": "fine"}\n{"prompt": "wrong key"}\n')
    with pytest.raises(PromptCollectionError, match=r"bad\.jsonl: line 2: .*string \"text\""):
        load_collection(PromptsConfig(source=str(path)), "rotten_tomatoes")


def test_bad_instructeval_yaml_names_file_and_line(tmp_path):
    (tmp_path / "manual").mkdir()
    bad = tmp_path / "manual" / "imdb.yaml"
    bad.write_text('- "one"\n- "two\n- three\n')
    with pytest.raises(PromptCollectionError, match=r"manual/imdb\.yaml: line \d+: not valid"):
        load_collection(PromptsConfig(source=str(tmp_path)), "imdb")
    bad.write_text('- "one"\n- {nested: map}\n')
    with pytest.raises(PromptCollectionError, match=r"imdb\.yaml: line 2: a prompt must be"):
        load_collection(PromptsConfig(source=str(tmp_path)), "imdb")
    bad.write_text("just: a mapping\n")
    with pytest.raises(PromptCollectionError, match=r"imdb\.yaml: line 1: expected a YAML list"):
        load_collection(PromptsConfig(source=str(tmp_path)), "imdb")


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(PromptCollectionError, match=r"prompts\.source: .*does not exist"):
        load_collection(PromptsConfig(source=str(tmp_path / "nope.csv")), "imdb")
    assert (BUILTIN_DIR / "rotten_tomatoes.jsonl").exists()


def _tiny(tmp_path, *overrides: str):
    return load_config("cpu-demo", [f"workdir={tmp_path / 'run'}", "target.backend=transformers",
                                    "task.dev_queries=4", *overrides])


def test_a_collection_without_sources_gets_an_announced_manual_default(tmp_path, capsys):
    from qpo_ray.run.loop import check_before_work

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
