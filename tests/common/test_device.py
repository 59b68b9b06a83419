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


@pytest.mark.parametrize("capability,native", [((7, 0), False), ((7, 5), False),
                                                ((8, 0), True), ((8, 6), True),
                                                ((9, 0), True), ((12, 0), True)],
                         ids=["V100", "T4", "A100", "A10", "H100", "sm120"])
def test_bf16_is_native_from_compute_capability_8_0(capability, native):
    """torch.cuda.is_bf16_supported() counts emulation (True on a V100): the helper
    decides from the capability, and `auto` takes fp16 below 8.0."""
    assert devices.bf16_native(capability) is native


def test_outside_a_ray_worker_no_ray_reservation_applies():
    assert devices.ray_gpu_ids() is None
    assert devices.may_use_gpu()


def test_a_zero_gpu_ray_actor_decides_cpu_though_it_sees_cuda_visible_devices(ray_cluster):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it is for num_gpus=0 actors (a Serve
    replica with 0 GPUs would load onto cuda:0): the helper reads Ray's assignment."""
    ray = ray_cluster

    @ray.remote(num_cpus=0, num_gpus=0)
    class Probe:
        def decide(self):
            import os

            from qpo_ray.common import device as d

            return (os.environ.get("CUDA_VISIBLE_DEVICES"), d.ray_gpu_ids(), d.may_use_gpu(),
                    d.has_cuda(), str(d.get_device()))

    probe = Probe.options(runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}}).remote()
    try:
        visible, ids, may, cuda, device = ray.get(probe.decide.remote(), timeout=120)
    finally:
        ray.kill(probe)
    assert visible == "0"  # the premise: Ray left the variable set
    assert ids == [] and may is False and cuda is False and device == "cpu"
