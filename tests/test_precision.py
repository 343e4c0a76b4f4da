"""Precision chosen per machine, and Muon's orthogonalization in the chosen dtype."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from conftest import REPO
from custom_llm import precision
from custom_llm.optimizer import Muon, orthogonalize

TORCH_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (32, 128), (192, 64)])
def test_orthogonalize_equals_torch_in_bfloat16_and_within_rounding_in_float32(shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    reference = _zeropower_via_newtonschulz(grad, TORCH_COEFFICIENTS, 5, 1e-7).float()
    assert torch.equal(orthogonalize(grad, dtype=torch.bfloat16).float(), reference)
    in_float32 = orthogonalize(grad, dtype=torch.float32)
    assert in_float32.dtype == torch.float32 and in_float32.shape == grad.shape
    # torch's own result is rounded to bfloat16 (8 bits of mantissa) at every iteration.
    assert (in_float32 - reference).abs().max() < 0.03 * reference.abs().max()
    # float32 is the exact iteration: it agrees with float64 far more closely.
    in_float64 = orthogonalize(grad.double(), dtype=torch.float64)
    assert (in_float32.double() - in_float64).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(32, 64), (32, 128), (200, 64)])
def test_the_gram_form_is_the_same_iteration(shape):
    """Wide matrices iterate on their small Gram matrix in float32: the same polynomial, so in
    float64 it equals the plain iteration to rounding."""
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b, c = TORCH_COEFFICIENTS
    x = grad.T if shape[0] > shape[1] else grad
    x = x / x.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    plain = x.T if shape[0] > shape[1] else x
    assert (orthogonalize(grad, dtype=torch.float64) - plain).abs().max() < 1e-12


def _muon_run(make, steps=4):
    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(40, 24))
    optimizer = make([weight])
    for i in range(steps):
        weight.grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(i))
        optimizer.step()
    return weight.detach().clone(), optimizer


OPTIONS = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")


def test_muon_in_bfloat16_steps_exactly_like_torch_and_shares_its_state():
    theirs, torch_optimizer = _muon_run(lambda p: torch.optim.Muon(p, **OPTIONS))
    ours, our_optimizer = _muon_run(lambda p: Muon(p, torch.bfloat16, **OPTIONS))
    assert torch.equal(theirs, ours)
    # A checkpoint of either loads into the other (old checkpoints hold torch.optim.Muon's state).
    fresh = Muon([torch.nn.Parameter(ours.clone())], torch.float32, **OPTIONS)
    fresh.load_state_dict(torch_optimizer.state_dict())
    assert torch.equal(next(iter(fresh.state.values()))["momentum_buffer"],
                       next(iter(torch_optimizer.state.values()))["momentum_buffer"])
    assert fresh.orthogonalize_dtype == torch.float32  # the machine's choice, not the checkpoint's


def test_muon_in_float32_stays_close_to_torch():
    theirs, _ = _muon_run(lambda p: torch.optim.Muon(p, **OPTIONS))
    ours, _ = _muon_run(lambda p: Muon(p, torch.float32, **OPTIONS))
    assert not torch.equal(theirs, ours)  # really another dtype
    assert (theirs - ours).abs().max() < 1e-3 * theirs.abs().max()


def test_forced_dtype_needs_no_probe():
    def no_probe():
        raise AssertionError("probed although --dtype was given")
    for name in ("float32", "bfloat16"):
        chosen = precision.choose_precision(name, "cpu", probe=no_probe)
        assert chosen.dtype == getattr(torch, name) and chosen.reason == f"--dtype {name}"


@pytest.mark.parametrize("float32_s, bfloat16_s, expected", [
    (10.0, 4.0, torch.bfloat16),    # AMX-like: bfloat16 matrix products 2.5x as fast
    (10.0, 9.0, torch.float32),     # a small win on products alone is no win on a training step
    (10.0, 50.0, torch.float32),    # AVX2: bfloat16 emulated, 5x slower
])
def test_auto_follows_the_probe(float32_s, bfloat16_s, expected):
    chosen = precision.choose_precision("auto", "cpu", probe=lambda: (float32_s, bfloat16_s))
    assert chosen.dtype == expected
    assert f"measured {float32_s / bfloat16_s:.1f}" in chosen.reason
    assert ("no native bfloat16" in chosen.reason) == (expected == torch.float32)
    assert chosen.describe().startswith("bfloat16 autocast" if expected == torch.bfloat16 else "float32")


def test_probe_is_cached_per_machine_and_isa_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "probe_seconds", lambda: calls.append(1) or (1.0, 2.0))
    assert precision.cached_probe() == (1.0, 2.0)
    assert precision.cached_probe() == (1.0, 2.0)
    assert len(calls) == 1
    saved = json.loads((tmp_path / "custom-llm-scripts" / "precision.json").read_text())
    assert list(saved.values()) == [[1.0, 2.0]]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")   # other kernels: another answer, probed again
    precision.cached_probe()
    assert len(calls) == 2


def _flags():
    return precision.cpu_info()[1]


def _probe_in_subprocess(tmp_path, **env):
    code = ("from custom_llm.precision import choose_precision; c = choose_precision('auto', 'cpu'); "
            "print(c.dtype, c.reason)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif("avx2" not in _flags(), reason="needs an x86 CPU with AVX2")
def test_a_plain_avx2_cpu_trains_in_float32(tmp_path):
    """oneDNN and ATen limited to AVX2 behave like an AVX2-only CPU (an AMD Zen 3, most laptops):
    bfloat16 products are emulated there, and the probe must see it."""
    said = _probe_in_subprocess(tmp_path, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    assert said.startswith("torch.float32") and "no native bfloat16" in said


@pytest.mark.skipif(not ({"amx_bf16", "avx512_bf16"} & _flags()), reason="needs native bfloat16 (AMX or AVX512-BF16)")
def test_a_cpu_with_native_bfloat16_trains_in_bfloat16(tmp_path):
    said = _probe_in_subprocess(tmp_path)
    assert said.startswith("torch.bfloat16"), said
