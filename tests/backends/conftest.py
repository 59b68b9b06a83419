"""The OpenAI-compatible test server (tests/backends/openai_server.py), started once per
module on the real tiny model; it answers to the model's path and to "tiny-served" (a
`--served-model-name` that is no Hugging Face id)."""

from __future__ import annotations

import pytest
import torch

from qpo_ray.backends import create_backend
from qpo_ray.config import TargetConfig
from tests.backends.openai_server import start_server, stop_server

SERVED_NAME = "tiny-served"


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    make = lambda chat: create_backend(TargetConfig(  # noqa: E731
        backend="transformers", model=str(tiny_model_dir), dtype="float32",
        use_chat_template=chat))
    yield {True: make(True), False: make(False)}
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(backends, tiny_model_dir):
    srv = start_server(backends[True], backends[False], (str(tiny_model_dir), SERVED_NAME))
    yield srv
    stop_server(srv)
