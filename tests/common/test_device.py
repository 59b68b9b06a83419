"""The one device helper: what `dtype: auto` becomes on a CPU (bf16 only where the CPU
multiplies bf16 in hardware) and what the run log says of it; a bf16 target on the real
model answers like the float32 one."""

from __future__ import annotations

import pytest
import torch

from qpo_ray.common import device as devices
from qpo_ray.backends import create_backend
from qpo_ray.config import TargetConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "plain-cpu"])
def test_auto_dtype_on_a_cpu_follows_its_bf16_instructions(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert devices.resolve_dtype("auto", CPU) == expected
    assert devices.dtype_name("auto", CPU) == str(expected).removeprefix("torch.")
    note = devices.dtype_note("auto", on_gpu=False)
    assert note.startswith(str(expected).removeprefix("torch.") + " (auto: this CPU ")
    assert ("multiplies bf16 in hardware" in note) == native
    # a named dtype is taken as it is, whatever the CPU, and the note says just its name
    assert devices.resolve_dtype("float32", CPU) == torch.float32
    assert devices.resolve_dtype("bf16", CPU) == torch.bfloat16
    assert devices.dtype_note("float32", on_gpu=False) == "float32"
    # training autocasts to the same dtype, and not at all where that is float32
    assert devices.autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert devices.autocast_dtype("no", CPU) is None
    assert devices.autocast_dtype("bf16", CPU) == torch.bfloat16


def test_the_cpu_probe_agrees_with_torch():
    probes = [getattr(torch.cpu, name)() for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
              if hasattr(torch.cpu, name)]
    assert devices.cpu_has_native_bf16() == any(probes)


def test_unknown_dtype_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*bfloat16.*float32"):
        devices.resolve_dtype("fp8", CPU)


def test_a_bf16_target_answers_like_the_float32_one(tiny_model_dir, one_torch_thread):
    """bf16 rounds every matmul: log-probs move (measured on 560 Step-0 pairs: by up to
    0.3 nats, 4-6% of predictions flip on near ties, accuracy unchanged), but clear
    reviews keep their answer and the label log-probs stay near float32's."""
    ask = "Is the sentiment of the following movie review positive or negative?\nReview: "
    prefixes = [ask + "a wonderful, moving film, the best of the year.\nAnswer:",
                ask + "dull, ugly and far too long; I walked out.\nAnswer:"]
    labels = [" positive", " negative"]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        backend = create_backend(TargetConfig(backend="transformers", model=str(tiny_model_dir),
                                              dtype=dtype, use_chat_template=False))
        assert next(backend.model.parameters()).dtype == devices.resolve_dtype(dtype, CPU)
        scores[dtype] = [[c.logprob_sum for c in row]
                         for row in backend.score_continuations(prefixes, labels)]
        backend.close()
    for fp32, bf16 in zip(scores["float32"], scores["bfloat16"]):
        assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.3
        assert fp32 != bf16  # it did compute in bf16
    assert [max((0, 1), key=row.__getitem__) for row in scores["float32"]] == [0, 1]
    assert [max((0, 1), key=row.__getitem__) for row in scores["bfloat16"]] == [0, 1]
