"""Profile inheritance (`extends:`) and sizes fitted to the data (qpo_ray/tasks/sizes.py)."""

from __future__ import annotations

import logging

import pytest

from qpo_ray.config import ConfigError, load_config
from qpo_ray.tasks.sizes import fit_sizes


def test_a_user_profile_extends_a_shipped_one(tmp_path):
    base = tmp_path / "mine.yaml"
    base.write_text("extends: cpu-demo\nloop:\n  num_loops: 3\n")
    child = tmp_path / "child.yaml"  # extends a file relative to itself
    child.write_text("extends: mine.yaml\ndataset:\n  wide: {queries: 100}\n")
    cfg = load_config(str(child), ["seed=7"])
    demo = load_config("cpu-demo")
    assert (cfg.loop.num_loops, cfg.dataset.wide.num_queries, cfg.seed) == (3, 100, 7)
    # everything else as cpu-demo says, down to nested sections
    assert cfg.dataset.wide.num_prompts == demo.dataset.wide.num_prompts == 8
    assert cfg.policy == demo.policy and cfg.target == demo.target


def test_extends_cycles_and_unknown_bases_name_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: extends: cycle .*a.yaml -> .*b.yaml -> "
                                          r".*a.yaml"):
        load_config(str(a))
    a.write_text("extends: cpu-demoo\n")
    with pytest.raises(ConfigError, match=r"a.yaml: extends: unknown profile 'cpu-demoo'"):
        load_config(str(a))


def test_sizes_that_fit_are_left_alone():
    cfg = load_config("cpu-demo")
    assert fit_sizes(cfg, "rotten_tomatoes", 8530) == {}  # 853 collection queries >= 532


def _fitted(cfg, name: str, n_train: int):
    return cfg.with_changes(fit_sizes(cfg, name, n_train))


def test_zero_shot_grows_the_collection_then_scales_with_one_line(caplog):
    cfg = load_config("cpu-demo")
    with caplog.at_level(logging.INFO, logger="qpo"):
        fitted = _fitted(cfg, "mine", 800)  # a 1,000-row file: 800 train rows
    # 532 queries fit in 800 rows at fraction 0.665: no size shrinks
    assert fitted.task.collection_fraction == 0.665 and cfg.task.collection_fraction == 0.1
    assert (fitted.task.dev_queries, fitted.dataset.queries_per_group,
            fitted.dataset.wide.queries) == (200, 32, 300)
    assert round(fitted.task.collection_fraction * 800) >= 532
    lines = [r.getMessage() for r in caplog.records if r.name == "qpo"]
    assert len(lines) == 1 and "task.collection_fraction 0.1 -> 0.665" in lines[0]
    assert fit_sizes(fitted, "mine", 800) == {}  # applied again (a resumed run): no change

    small = _fitted(load_config("cpu-demo"), "mine", 300)  # 270 queries at most: x 270/532
    assert small.task.collection_fraction == 0.9
    sizes = (small.task.dev_queries, small.dataset.queries_per_group,
             small.dataset.wide.num_queries)
    assert sizes == (101, 16, 152) and sum(sizes) <= 270


def test_few_shot_keeps_its_demonstrations_and_scales_down():
    cfg = _fitted(load_config("cpu-demo", ["task.num_shots=2", "dataset.wide.enable=false"]),
                  "mine", 2000)  # 200 collection queries for 232 asked
    assert cfg.task.collection_fraction == 0.1
    assert (cfg.task.dev_queries, cfg.dataset.queries_per_group) == (172, 27)


def test_too_little_data_is_refused_once_naming_every_setting():
    cfg = load_config("cpu-demo")
    with pytest.raises(ConfigError) as info:
        fit_sizes(cfg, "tiny", 60)
    message = str(info.value)
    for key in ("task.dev_queries=200", "dataset.queries_per_group=32",
                "dataset.wide.queries=300", "task.collection_fraction=0.1", "60 rows"):
        assert key in message
    # the smallest train split it names does fit
    rows = int(message.split("at least ")[-1].split(" rows")[0])
    fit_sizes(load_config("cpu-demo"), "tiny", rows)
    with pytest.raises(ConfigError):
        fit_sizes(load_config("cpu-demo"), "tiny", rows - 2)
