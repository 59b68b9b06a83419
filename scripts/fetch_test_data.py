#!/usr/bin/env python3
"""Fetch the public data sets the tests read, or verify a folder that has them.

    python scripts/fetch_test_data.py               # download what is missing or changed
    python scripts/fetch_test_data.py --verify      # check every file, download nothing
    python scripts/fetch_test_data.py --only gsm8k/ tweet_emotion/mapping.txt

The folder is QPO_SHARED_DATA, else ../shared/data beside the repository (where the tests
look; tests/conftest.py). Every file is a verbatim copy of an upstream file, pinned to a
commit, and checked against its sha256 in scripts/test_data.sha256 (`sha256sum -c` reads
that file too). Standard library only, so it runs before scripts/setup.sh.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path(__file__).resolve().parent / "test_data.sha256"
RAW = "https://raw.githubusercontent.com"

# Local folder -> (GitHub repository, commit the checksums were taken at, its folder there).
SOURCES = {
    "tweet_emotion/": ("cardiffnlp/tweeteval", "4fbd22cd78421f05b1ecdb4fc5725bc7a7bd8f66",
                       "datasets/emotion/"),
    "ag_news/": ("mhjabreel/CharCnn_Keras", "555590db4219b1243abb1918effd6a7425a2d75f",
                 "data/ag_news_csv/"),
    "gsm8k/": ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
               "grade_school_math/data/"),
    "cosmos_qa/": ("wilburOne/cosmosqa", "b6eb99cca4e2a51dd28a9a6f562534872d851639", "data/"),
    "instructeval_prompts/": ("princeton-nlp/InstructEval",
                              "8abacb4ca609eb351837bec4c2b698471cf20aa6", "instructions/"),
}
# Files kept under another name than upstream's.
RENAMED = {
    "qpo_offline/tweet_emotion_llama7b_few_shot_expert.json": (
        "KongYilun/QPO", "8dc335e934ba2970b7cc9a2cd12653f01ec18216",
        "data/tweet_emotion/tweet_emotion_llama7b_ocml_round1_few_shot_expert.json"),
}


def default_dest() -> Path:
    return Path(os.environ.get("QPO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """{relative path: sha256} from a `sha256sum`-format file."""
    entries: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            raise SystemExit(f"{path}:{n}: expected '<sha256>  <path>', got {line!r}")
        entries[rel] = digest
    return entries


def upstream_url(rel: str, mirror: str = RAW) -> str:
    """The pinned upstream address of one file of the data folder."""
    if rel in RENAMED:
        repo, commit, path = RENAMED[rel]
        return f"{mirror}/{repo}/{commit}/{path}"
    for prefix, (repo, commit, up) in SOURCES.items():
        if rel.startswith(prefix):
            return f"{mirror}/{repo}/{commit}/{up}{rel[len(prefix):]}"
    raise KeyError(f"no upstream source known for {rel}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def selected(entries: dict[str, str], only: list[str]) -> dict[str, str]:
    if not only:
        return entries
    chosen = {rel: d for rel, d in entries.items() if any(rel.startswith(o) for o in only)}
    unknown = [o for o in only if not any(rel.startswith(o) for rel in entries)]
    if unknown:
        raise SystemExit(f"--only: not in {MANIFEST.name}: {', '.join(unknown)}")
    return chosen


def verify(dest: Path, entries: dict[str, str]) -> list[str]:
    """One line per file that is missing or differs from its recorded checksum."""
    problems = []
    for rel, digest in entries.items():
        path = dest / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif (got := sha256(path)) != digest:
            problems.append(f"changed: {rel} (sha256 {got[:12]}..., expected {digest[:12]}...)")
    return problems


def fetch_one(dest: Path, rel: str, digest: str, mirror: str, timeout_s: float) -> None:
    """Download to a temporary sibling, check its sha256, then rename into place."""
    url = upstream_url(rel, mirror)
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        got = sha256(Path(tmp))
        if got != digest:
            raise ValueError(f"sha256 {got[:12]}... != recorded {digest[:12]}... "
                             "(upstream changed, or a proxy rewrote it)")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=None,
                    help="data folder (default: $QPO_SHARED_DATA or ../shared/data)")
    ap.add_argument("--verify", action="store_true",
                    help="only check the files against scripts/test_data.sha256")
    ap.add_argument("--only", nargs="+", default=[], metavar="PATH",
                    help="files or folder prefixes (e.g. gsm8k/) instead of all")
    ap.add_argument("--mirror", default=os.environ.get("QPO_TEST_DATA_MIRROR", RAW),
                    help="base URL laid out as raw.githubusercontent.com (default: it)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = ap.parse_args(argv)

    dest = (args.dest or default_dest()).resolve()
    entries = selected(read_manifest(), args.only)
    if args.verify:
        problems = verify(dest, entries)
        for line in problems:
            print(line)
        if problems:
            print(f"{len(problems)} of {len(entries)} files failed in {dest}; "
                  "fetch them with: python scripts/fetch_test_data.py", file=sys.stderr)
            return 1
        print(f"ok: {len(entries)} files match {MANIFEST.name} in {dest}")
        return 0

    todo = {rel: d for rel, d in entries.items()
            if not (dest / rel).is_file() or sha256(dest / rel) != d}
    print(f"{len(entries) - len(todo)} of {len(entries)} files already in {dest}; "
          f"fetching {len(todo)}")
    failed = []
    for rel, digest in todo.items():
        try:
            fetch_one(dest, rel, digest, args.mirror.rstrip("/"), args.timeout)
        except (OSError, ValueError) as e:
            failed.append(rel)
            print(f"failed: {rel} from {upstream_url(rel, args.mirror.rstrip('/'))}: {e}",
                  file=sys.stderr)
    if failed:
        print(f"{len(failed)} files not fetched; nothing partial was left in {dest}",
              file=sys.stderr)
        return 1
    print(f"ok: {len(entries)} files in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
