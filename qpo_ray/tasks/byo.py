"""Bring your own task: a YAML file describes the data and the answer format, and the
task then works everywhere a built-in one does (``task.name: byo``,
``task.spec_path: my_task.yaml``). The YAML keys:

```yaml
name: movie_sentiment          # required: used in ids, logs and prompt collections
type: classification           # classification (label scoring) | generation
files:                         # CSV/TSV (header row), JSON, JSONL or Parquet; relative
                               #   to this YAML and inside its folder (see "Paths"
                               #   below). Errors name a file's "row N": its
                               #   N-th record (not counting a CSV header)
  train: data/train.csv        # at least one split; with only one, a seeded 80/20
  test: data/test.jsonl        #   train/test split is carved from it (logged)
  # or one example per line plus a parallel label file (line N labels line N; errors
  # name the file and line; text_columns / label_column are then not needed):
  # validation: {text: data/dev.txt, labels: data/dev_labels.txt}
text_columns: [title, body]    # one or more columns (or `text_column: text`)
text_template: "{title}: {body}"   # optional; default joins the columns with newlines;
                               #   fields are column names, widths at most 1000
label_column: label
label_words:                   # classification: raw label value -> label word
  0: negative
  1: positive
answer_regex: "-?\\d+"         # generation: the answer is the regex's last match in the
                               #   output (group 1 when the regex has a group); at most
                               #   200 characters, no repetition or alternation inside a
                               #   repeated group (see "Regex")
input_label: Input             # optional: the word before the query ("Input: ...")
few_shot: true                 # optional: whether demonstrations make sense
```

Paths: a spec may come from someone else, and its files end up in prompts, logs and
MLflow. So a file is read only from the spec's own folder: a relative path without
`..`, which after following symlinks still lies inside that folder. An absolute path,
a `..` or a symlink leading out is refused unless the user running qpo says so in
their own config, `task.spec_outside_files: true` (never in the spec itself).

Regex: `answer_regex` runs on every target output. Python's `re` has no timeout, so a
pattern that can backtrack exponentially ("(a|aa)+$", "(\\w+\\s?)+$") would hang scoring;
the spec is refused instead when a repeated group holds another repetition or an
alternation (use a character class, or a possessive `++` / atomic `(?>...)` group).
"""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Any, Optional

import yaml

from qpo_ray.config import TaskConfig
from qpo_ray.tasks.base import Example, Task
from qpo_ray.tasks.files import (TaskDataError, carve, read_rows, read_text_and_labels,
                                 require_columns)
from qpo_ray.tasks.math_word import same_answer

SPLIT_NAMES = ("train", "validation", "test")
# Bounds on what a spec runs: the answer regex's length, a format field's width/precision.
MAX_REGEX_CHARS = 200
MAX_FORMAT_WIDTH = 1000


class SpecError(TaskDataError):
    """The task YAML is malformed; the message names the file and the key."""


def _raw_key(value: Any) -> str:
    """Label values compared as text: 1, "1" and 1.0 are the same label; None/NaN is ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


class ByoTask(Task):
    name = "byo"

    def __init__(self, cfg: TaskConfig):
        if not cfg.spec_path:
            raise SpecError("task.spec_path: required when task.name is 'byo'")
        self.cfg = cfg
        self.spec_path = Path(cfg.spec_path).expanduser()
        spec = self._read_spec()
        self.name = self._get(spec, "name", str)
        kind = self._get(spec, "type", str)
        if kind not in ("classification", "generation"):
            raise self._error("type", f"{kind!r} is not classification or generation")
        self.mode = "labels" if kind == "classification" else "generate"
        self.files = self._files(spec)
        line_files = all(isinstance(f, tuple) for f in self.files.values())
        columns = spec.get("text_columns", spec.get("text_column", "text" if line_files else None))
        if isinstance(columns, str):
            columns = [columns]
        if not columns or not all(isinstance(c, str) for c in columns):
            raise self._error("text_columns", "a column name or a list of column names")
        self.text_columns: list[str] = columns
        self.text_template: Optional[str] = spec.get("text_template")
        if self.text_template is not None:
            self._check_template(str(self.text_template), columns)
        if line_files and "label_column" not in spec:
            spec["label_column"] = "label"
        self.label_column = self._get(spec, "label_column", str)
        self.input_label = str(spec.get("input_label", "Input"))
        self.supports_few_shot = bool(spec.get("few_shot", True))
        self.word_of: dict[str, str] = {}
        self.answer_regex: Optional[re.Pattern[str]] = None
        if self.mode == "labels":
            self._label_words(spec)
        else:
            self._answer_regex(spec)
        self._cache: dict[str, list[Example]] = {}

    # -- the spec ---------------------------------------------------------------------

    def _read_spec(self) -> dict[str, Any]:
        if not self.spec_path.exists():
            raise SpecError(f"{self.spec_path}: task spec not found (task.spec_path)")
        try:
            spec = yaml.safe_load(self.spec_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}:" if mark is not None else ""
            raise SpecError(f"{self.spec_path}:{line} not valid YAML ({exc})") from exc
        if not isinstance(spec, dict):
            raise SpecError(f"{self.spec_path}: a task spec must be a YAML mapping")
        return spec

    def _error(self, key: str, message: str) -> SpecError:
        return SpecError(f"{self.spec_path}: key '{key}': {message}")

    def _get(self, spec: dict[str, Any], key: str, kind: type) -> Any:
        if key not in spec:
            raise self._error(key, "missing")
        if not isinstance(spec[key], kind) or spec[key] == "":
            raise self._error(key, f"expected a non-empty {kind.__name__}, got {spec[key]!r}")
        return spec[key]

    def _files(self, spec: dict[str, Any]) -> dict[str, Path | tuple[Path, Path]]:
        """split -> a data file, or (text file, label file) for the line layout."""
        files = spec.get("files")
        if not isinstance(files, dict) or not files:
            raise self._error("files", "a mapping of split (train/validation/test) to a file")
        out: dict[str, Path | tuple[Path, Path]] = {}
        for split, name in files.items():
            if split not in SPLIT_NAMES:
                raise self._error(f"files.{split}", f"unknown split (known: {SPLIT_NAMES})")
            if isinstance(name, dict):
                if set(name) != {"text", "labels"}:
                    raise self._error(f"files.{split}", "a file, or {text: <one example per "
                                      f"line>, labels: <one label per line>}}, got {name}")
                out[split] = (self._path(split, name["text"], "text"),
                              self._path(split, name["labels"], "labels"))
            else:
                out[split] = self._path(split, name)
        if "train" not in out and "test" not in out:
            raise self._error("files", "needs a train or a test file")
        return out

    def _path(self, split: str, name: Any, part: str = "") -> Path:
        """A data file: inside the spec's folder unless task.spec_outside_files (module
        docstring, "Paths")."""
        key = f"files.{split}" + (f".{part}" if part else "")
        given = Path(str(name)).expanduser()
        folder = self.spec_path.parent.resolve()
        path = given if given.is_absolute() else folder / given
        if not self.cfg.spec_outside_files:
            allow = ("; only files inside the spec's folder are read unless you set "
                     "task.spec_outside_files: true in your config")
            if given.is_absolute():
                raise self._error(key, f"{name}: an absolute path{allow}")
            if ".." in given.parts:
                raise self._error(key, f"{name}: '..' leaves the spec's folder {folder}{allow}")
            if path.exists() and not path.resolve().is_relative_to(folder):
                raise self._error(key, f"{name}: a symlink to {path.resolve()}, outside the "
                                       f"spec's folder {folder}{allow}")
        if not path.exists():
            raise self._error(key, f"{path}: file not found")
        return path

    def _check_template(self, template: str, columns: list[str]) -> None:
        """Fields name columns (no positional, attribute or index fields), no nested
        fields, widths and precisions at most MAX_FORMAT_WIDTH: a template formats every
        query, and "{title:>999999999}" would fill the memory."""
        try:
            parsed = [(f, spec) for _, f, spec, _ in string.Formatter().parse(template)
                      if f is not None]
        except ValueError as exc:
            raise self._error("text_template", f"not a format string ({exc})") from None
        fields = {f for f, _ in parsed}
        if not fields <= set(columns):
            raise self._error("text_template", f"uses {sorted(fields - set(columns))}, "
                                               f"not in text_columns {columns}")
        for field, spec in parsed:
            if "{" in spec:
                raise self._error("text_template", f"{{{field}:{spec}}}: nested fields are "
                                                   "not allowed")
            if any(int(n) > MAX_FORMAT_WIDTH for n in re.findall(r"\d+", spec)):
                raise self._error("text_template", f"{{{field}:{spec}}}: a width or "
                                  f"precision above {MAX_FORMAT_WIDTH}")
        try:
            template.format(**{c: "x" for c in columns})
        except (ValueError, IndexError, KeyError) as exc:
            raise self._error("text_template", f"does not format text values ({exc})") from None

    def _label_words(self, spec: dict[str, Any]) -> None:
        mapping = spec.get("label_words")
        if not isinstance(mapping, dict) or len(mapping) < 2:
            raise self._error("label_words", "a mapping of raw label value -> label word, "
                                             "with at least two labels")
        for key, word in mapping.items():
            if not isinstance(word, (str, int, float)) or isinstance(word, bool):
                raise self._error(f"label_words.{key}", f"{word!r} is not a word (YAML reads "
                                  "unquoted yes/no/on/off/true/false as booleans: quote it)")
        words = [str(w).strip() for w in mapping.values()]
        if any(not w for w in words) or len(set(words)) != len(words):
            raise self._error("label_words", f"label words must be non-empty and distinct: "
                                             f"{words}")
        self.word_of = {_raw_key(k): str(w).strip() for k, w in mapping.items()}
        self.label_words = tuple(words)

    def _answer_regex(self, spec: dict[str, Any]) -> None:
        pattern = str(spec.get("answer_regex", r"-?\d[\d,]*(?:\.\d+)?"))
        if len(pattern) > MAX_REGEX_CHARS:
            raise self._error("answer_regex", f"{len(pattern)} characters, more than "
                                              f"{MAX_REGEX_CHARS}")
        try:
            self.answer_regex = re.compile(pattern)
        except re.error as exc:
            raise self._error("answer_regex", f"not a valid regex ({exc})") from exc
        if problem := _backtracking_risk(pattern):
            raise self._error("answer_regex", f"{pattern!r}: {problem}, which can backtrack "
                              "exponentially on a long output; use a character class, or "
                              "a possessive (++, *+) or atomic (?>...) group")

    # -- data -------------------------------------------------------------------------

    def load_split(self, split: str) -> list[Example]:
        if split not in SPLIT_NAMES:
            raise ValueError(f"task {self.name}: unknown split {split!r}")
        if split not in self._cache:
            labelled = [s for s in ("train", "test") if s in self.files]
            if split in ("train", "test") and len(labelled) == 1:
                # One file only: both train and test are carved from it, disjointly.
                only = self.files[labelled[0]]
                examples = carve(self._read(only), split, str(only[0] if isinstance(only, tuple)
                                                               else only))
            elif split in self.files:
                examples = self._read(self.files[split])
            else:
                raise self._error("files", f"no {split!r} file")
            self._cache[split] = examples
        return list(self._cache[split])

    def _read(self, path: Path | tuple[Path, Path]) -> list[Example]:
        if isinstance(path, tuple):
            text_path, label_path = path
            rows = [{**r, **{c: r["text"] for c in self.text_columns},
                     self.label_column: r["label"]}
                    for r in read_text_and_labels(text_path, label_path)]
            return [self._example(row, text_path, i) for i, row in enumerate(rows)]
        rows = read_rows(path)
        for key, columns in (("text_columns", self.text_columns),
                             ("label_column", [self.label_column])):
            try:
                require_columns(rows, columns, path, where=f"{self.spec_path} key '{key}'")
            except TaskDataError as exc:
                raise SpecError(str(exc)) from None
        return [self._example(row, path, i) for i, row in enumerate(rows)]

    def _example(self, row: dict[str, Any], path: Path, index: int) -> Example:
        where = row.get("_where_text", f"{path}: row {index + 1}")
        where_label = row.get("_where_label", where)
        for column in (*self.text_columns, self.label_column):
            if column not in row:  # JSON rows may differ from the first one
                raise TaskDataError(f"{where}: no column {column!r}")
        values = {c: _raw_key(row[c]) for c in self.text_columns}
        if self.text_template is not None:
            text = self.text_template.format(**values).strip()
        else:
            text = "\n".join(v for v in values.values() if v)
        if not text:
            raise TaskDataError(f"{where}: empty text in {self.text_columns}")
        raw = row[self.label_column]
        if _raw_key(raw) == "":
            raise TaskDataError(f"{where_label}: empty label in column {self.label_column!r}")
        if self.mode == "labels":
            word = self.word_of.get(_raw_key(raw))
            if word is None:
                raise TaskDataError(f"{where_label}: label {raw!r} has no entry under key "
                                    f"'label_words' in {self.spec_path} "
                                    f"(known: {sorted(self.word_of)})")
            label: int | str = self.label_words.index(word)
        else:
            label = _raw_key(raw)
        return Example(f"{path.stem}-{index}", text, label)

    # -- answers ----------------------------------------------------------------------

    def format_query(self, query: Example) -> str:
        return f"{self.input_label}: {query.text}\nAnswer:"

    def parse(self, output: str) -> str:
        assert self.answer_regex is not None
        matches = list(self.answer_regex.finditer(output))
        if not matches:
            return ""
        last = matches[-1]
        return (last.group(1) if last.groups() else last.group(0)).strip()

    def is_correct(self, example: Example, prediction: int | str) -> bool:
        if self.mode == "labels":
            return super().is_correct(example, prediction)
        return same_answer(str(example.label), str(prediction))


def _backtracking_risk(pattern: str) -> Optional[str]:
    """What in `pattern` can make `re` backtrack exponentially: a repetition or an
    alternation inside a repeated group (the safe subset of module docstring "Regex");
    None when there is none. Possessive repeats and atomic groups never backtrack into
    themselves and are allowed."""
    from re import _constants as c, _parser  # the parse tree `re` itself compiles

    def walk(items, inside: bool) -> Optional[str]:
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                _, high, sub = av
                repeats = high is c.MAXREPEAT or high > 1
                if inside and repeats:
                    return "a repetition inside a repeated group"
                found = walk(sub, inside or repeats)
            elif op == c.BRANCH:
                if inside and len(av[1]) > 1:
                    return "an alternation inside a repeated group"
                found = next((r for alt in av[1] if (r := walk(alt, inside))), None)
            elif op == c.SUBPATTERN:
                found = walk(av[-1], inside)
            elif op in (c.ASSERT, c.ASSERT_NOT):
                found = walk(av[1], inside)
            elif op == c.GROUPREF_EXISTS:
                found = walk(av[1], inside) or (walk(av[2], inside) if av[2] else None)
            else:  # literals, classes, anchors; possessive repeats and atomic groups
                found = None
            if found:
                return found
        return None

    return walk(_parser.parse(pattern), False)
