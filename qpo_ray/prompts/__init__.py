"""Prompt collections: the initial prompts of Step 0 and the manual baseline.

`prompts.source` is one of
- ``builtin``: the project's own collection for the task (``prompts/data/<task>.jsonl``);
- an InstructEval-layout directory: ``<method>/<task>.yaml`` (a YAML list of strings),
  low-perplexity prompts as ``low_perplexity_prompts/<model>/<task>.yaml`` (method name
  ``low_perplexity_prompts/<model>``; ``prompts.methods: [low_perplexity_prompts]``
  selects every model);
- a ``.txt`` file (one prompt per line, source ``custom``) or a ``.jsonl`` file
  (``{"text": ..., "source": ...}``, source optional).

Every prompt keeps its source method; its id is a hash of its text, so the same prompt
has the same id in every collection, run and augmentation round. Repeated texts are kept
once (first occurrence).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from qpo_ray.config import PromptsConfig
from qpo_ray.common.jsonl import read_jsonl

logger = logging.getLogger(__name__)
_WARNED_EMPTY: set[str] = set()

BUILTIN_DIR = Path(__file__).parent / "data"


class PromptCollectionError(ValueError):
    """A prompt file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    text: str
    source: str


def prompt_id(text: str) -> str:
    """Stable id of a prompt text (collection prompts and generated ones alike)."""
    return "p-" + hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:12]


def load_collection(cfg: PromptsConfig, task_name: str) -> list[PromptRecord]:
    """The initial prompt collection for `task_name` as `cfg` says (see module doc)."""
    if cfg.source == "builtin":
        path = BUILTIN_DIR / f"{task_name}.jsonl"
        if not path.exists():
            known = sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))
            raise PromptCollectionError(
                f"prompts.source: no builtin collection for task {task_name!r} (builtin: "
                f"{known}); point prompts.source at a .txt/.jsonl file or an InstructEval "
                "directory")
        pairs = _read_jsonl(path)
    else:
        path = Path(cfg.source).expanduser()
        if path.is_dir():
            pairs = _read_instructeval(path, task_name, cfg.methods)
        elif path.suffix == ".jsonl":
            pairs = _read_jsonl(path)
        elif path.suffix == ".txt":
            pairs = _read_txt(path)
        else:
            raise PromptCollectionError(
                f"prompts.source: {path} is not 'builtin', a directory, a .txt or a .jsonl "
                "file" + ("" if path.exists() else " (it does not exist)"))
    if cfg.methods is not None and not path.is_dir():
        pairs = [(text, source) for text, source in pairs if source in cfg.methods]
    # InstructEval's `no_instruction` method is one empty prompt. Scored in Step 0 it
    # would fail training later (a pair's prompt must be text the policy can learn to
    # write), so it is left out here, before any work, and said so.
    empty = sorted({source for text, source in pairs if not text.strip()})
    if empty and str(path) not in _WARNED_EMPTY:  # stages reload it: said once per process
        _WARNED_EMPTY.add(str(path))
        logger.warning("%s: empty prompts left out of the collection (from %s): the policy "
                       "learns to write prompts, and an empty one is none", path,
                       ", ".join(empty))
    pairs = [(text, source) for text, source in pairs if text.strip()]
    records = _dedupe(pairs)
    if not records:
        raise PromptCollectionError(f"{path}: no prompts for task {task_name!r}"
                                    + (f" and methods {cfg.methods}" if cfg.methods else ""))
    return records


def resolve_prompt(records: list[PromptRecord], ref: str | int, key: str) -> PromptRecord:
    """The collection prompt a user named by `ref`: its id (``p-...``), its index in the
    collection (0-based, as ``qpo prompts`` lists them) or its exact text. Errors name
    the setting `key` and show the first prompts with their index and id."""
    if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
        index = int(ref)
        if 0 <= index < len(records):
            return records[index]
        problem = f"index {index} is outside the collection (0..{len(records) - 1})"
    else:
        text = str(ref).strip()
        for record in records:
            if text in (record.id, record.text):
                return record
        problem = f"{ref!r} is neither a prompt id, an index nor a prompt's text"
    shown = "; ".join(f"{i}: {r.id} {r.text[:40]!r}" for i, r in enumerate(records[:5]))
    more = f" ... ({len(records)} in all; `qpo prompts` lists them)" if len(records) > 5 else ""
    raise PromptCollectionError(f"{key}: {problem}; the collection: {shown}{more}")


def manual_prompt(records: list[PromptRecord], cfg: PromptsConfig) -> PromptRecord:
    """The manual baseline: `cfg.manual_prompt_id` (an id, index or text), else the
    first prompt with source `manual`, else (a collection without sources, e.g. a .txt
    file) the first prompt; `manual_prompt_note` says so before any work starts."""
    if cfg.manual_prompt_id is not None:
        return resolve_prompt(records, cfg.manual_prompt_id, "prompts.manual_prompt_id")
    for record in records:
        if record.source == "manual":
            return record
    return records[0]


def manual_prompt_note(records: list[PromptRecord], cfg: PromptsConfig) -> str | None:
    """The announcement when the manual baseline is a default rather than a choice."""
    chosen = manual_prompt(records, cfg)
    if cfg.manual_prompt_id is not None or chosen.source == "manual":
        return None
    return (f"prompts: no prompt with source 'manual' in {cfg.source}; the manual baseline "
            f"is prompt 0 ({chosen.id}): {chosen.text[:80]!r} (set prompts.manual_prompt_id "
            "to an id, index or text to pick another)")


def _dedupe(pairs: list[tuple[str, str]]) -> list[PromptRecord]:
    records: dict[str, PromptRecord] = {}
    for text, source in pairs:
        record = PromptRecord(prompt_id(text), text.strip(), source)
        if record.id in records:
            logger.info("prompt %r (%s) repeats an earlier one; kept once", text, source)
            continue
        records[record.id] = record
    return list(records.values())


def _read_txt(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        raise PromptCollectionError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(line.strip(), "custom") for line in lines if line.strip()]


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        raise PromptCollectionError(f"{path}: file not found")
    pairs = []
    for number, row in read_jsonl(path, PromptCollectionError):
        if not isinstance(row.get("text"), str):
            raise PromptCollectionError(f"{path}: line {number}: expected an object with a "
                                        'string "text"')
        source = row.get("source", "custom")
        if not isinstance(source, str) or not source:
            raise PromptCollectionError(f'{path}: line {number}: "source" must be a '
                                        "non-empty string")
        pairs.append((row["text"], source))
    return pairs


def _instructeval_files(root: Path, task_name: str) -> dict[str, Path]:
    """method -> `<method>/<task>.yaml` (and `low_perplexity_prompts/<model>/<task>.yaml`)."""
    files = {}
    for path in sorted(root.glob(f"*/{task_name}.yaml")) + sorted(
            root.glob(f"*/*/{task_name}.yaml")):
        files[path.parent.relative_to(root).as_posix()] = path
    return files


def _read_instructeval(root: Path, task_name: str,
                       methods: list[str] | None) -> list[tuple[str, str]]:
    files = _instructeval_files(root, task_name)
    if not files:
        raise PromptCollectionError(f"{root}: no <method>/{task_name}.yaml files")
    if methods is not None:
        for method in methods:
            if not any(m == method or m.startswith(method + "/") for m in files):
                raise PromptCollectionError(f"prompts.methods: {method!r} has no "
                                            f"{task_name}.yaml in {root} (found: {sorted(files)})")
        files = {m: p for m, p in files.items()
                 if any(m == x or m.startswith(x + "/") for x in methods)}
    pairs = []
    for method, path in files.items():
        pairs += [(text, method) for text in _read_yaml_list(path)]
    return pairs


def _read_yaml_list(path: Path) -> list[str]:
    """A YAML list of strings; errors carry the file and line (from the YAML nodes)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise PromptCollectionError(f"{path}:{where} not valid YAML ({exc})") from exc
    if not isinstance(node, yaml.SequenceNode):
        line = node.start_mark.line + 1 if node is not None else 1
        raise PromptCollectionError(f"{path}: line {line}: expected a YAML list of prompts")
    texts = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode):
            raise PromptCollectionError(f"{path}: line {item.start_mark.line + 1}: a prompt "
                                        "must be a string")
        texts.append(item.value)
    return texts
