"""scripts/fetch_test_data.py: the shared data checks out, a changed file is named, and a
download is checked before it lands (from a mirror on 127.0.0.1; no network here)."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fetch_test_data.py"
SMALL = "tweet_emotion/mapping.txt"  # 34 bytes: the one file these tests copy


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120)


def _module():
    spec = importlib.util.spec_from_file_location("fetch_test_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verify_passes_on_the_shared_data(shared_data):
    r = _run("--verify", "--dest", str(shared_data))
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(_module().read_manifest())
    assert n > 150 and f"ok: {n} files match" in r.stdout


def test_verify_names_a_changed_file(shared_data, tmp_path):
    (tmp_path / SMALL).parent.mkdir(parents=True)
    shutil.copyfile(shared_data / SMALL, tmp_path / SMALL)
    ok = _run("--verify", "--dest", str(tmp_path), "--only", SMALL)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    with open(tmp_path / SMALL, "ab") as f:
        f.write(b"x")
    bad = _run("--verify", "--dest", str(tmp_path), "--only", SMALL)
    assert bad.returncode == 1
    assert f"changed: {SMALL}" in bad.stdout
    missing = _run("--verify", "--dest", str(tmp_path), "--only", "gsm8k/test.jsonl")
    assert missing.returncode == 1 and "missing: gsm8k/test.jsonl" in missing.stdout


def test_every_manifest_file_has_a_pinned_upstream_url():
    mod = _module()
    for rel in mod.read_manifest():
        url = mod.upstream_url(rel)
        assert re.match(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/",
                        url), (rel, url)


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/mirror laid out as raw.githubusercontent."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_downloads_checks_and_refuses_a_tampered_file(shared_data, tmp_path, mirror):
    root, base = mirror
    mod = _module()
    served = root / mod.upstream_url(SMALL, mirror="").lstrip("/")
    served.parent.mkdir(parents=True)
    shutil.copyfile(shared_data / SMALL, served)

    dest = tmp_path / "data"
    r = _run("--dest", str(dest), "--only", SMALL, "--mirror", base)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (dest / SMALL).read_bytes() == (shared_data / SMALL).read_bytes()

    (dest / SMALL).unlink()
    served.write_bytes(served.read_bytes() + b"tampered\n")
    r = _run("--dest", str(dest), "--only", SMALL, "--mirror", base)
    assert r.returncode == 1
    assert f"failed: {SMALL}" in r.stderr and "sha256" in r.stderr
    assert list((dest / SMALL).parent.iterdir()) == []  # nothing partial left behind
