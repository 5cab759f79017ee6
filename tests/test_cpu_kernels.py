"""The compiled CPU kernels (csrc/*_cpu.cpp, ``dpkernels._cpu``) against the references.

Noise (philox_cpu.cpp): integers bit for bit with ``dpkernels/ops/philox.py``; normals bit for bit
with csrc/philox.cuh compiled for the host (the code the CUDA kernels run) on every vector path,
and within a float32 ulp or two of the torch reference; independent of the thread count; the
reference where the kernel cannot be built. Patches (patches_cpu.cpp): exactly the torch
reference's patch matrices over 1-d/2-d geometries, padding modes, groups, dtypes and strides.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpkernels import _cpu
from dpkernels.ops import conv_patches, philox
from dpkernels.ops.philox import MASK32, PhiloxKey, philox4x32_10, philox_normal

from test_cuda_clip_sum_noise import host_philox  # noqa: F401  (the fixture: philox.cuh built for the host)

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"CPU kernel unavailable: {_cpu.why_unavailable()}")

KEYS = [PhiloxKey(0), PhiloxKey(12345, 7, 3), PhiloxKey(2**64 - 1, 2**32 - 1, 2**32 - 1), PhiloxKey(2**40 + 5, 0, 9)]


@pytest.mark.parametrize("key", KEYS, ids=str)
@pytest.mark.parametrize("offset", [0, 1, 2**32 - 3, 2**40])
def test_philox_words_are_the_reference_bit_for_bit(key, offset):
    n = 777
    c = torch.arange(offset, offset + n, dtype=torch.int64)
    ref = torch.stack(
        philox4x32_10(
            c & MASK32,
            (c >> 32) & MASK32,
            torch.full_like(c, key.step),
            torch.full_like(c, key.stream),
            key.seed_lo,
            key.seed_hi,
        ),
        dim=1,
    )
    assert torch.equal(_cpu.philox4x32(n, key, offset=offset), ref)


@pytest.mark.parametrize("key", KEYS, ids=str)
@pytest.mark.parametrize("numel", [0, 1, 2, 3, 1000, 4097])
def test_normals_match_the_reference(key, numel):
    z = philox.normal(numel, key)
    ref = philox_normal(numel, key)
    assert z.dtype == torch.float32 and z.shape == (numel,)
    assert torch.isfinite(z).all()
    if numel:
        assert (z - ref).abs().max().item() <= 2e-6  # |z| < 9.5: a couple of float32 ulps


def test_normals_are_the_cuda_headers_bit_for_bit(host_philox):  # noqa: F811
    for key in KEYS[1:]:
        _, z_host = host_philox([(key.seed, key.step, key.stream, e) for e in range(2048)])
        assert torch.equal(philox.normal(2048, key), z_host)


@pytest.fixture
def each_path():
    """Runs the test body once per vector path this CPU has (avx512, avx2, scalar), then restores."""
    before = _cpu.isa()
    paths = [p for p in ("scalar", "avx2", "avx512") if _cpu.set_isa(p) == p]
    yield paths
    _cpu.set_isa(before)


def test_the_vector_paths_draw_the_scalar_paths_normals(each_path):
    """libmvec's double ln/sin/cos against libm's, rounded to float32: equal on 2^21 draws of
    several keys and at counters past 2^32 (they may differ in ~1e-8 of draws, by one ulp)."""
    if each_path == ["scalar"]:
        pytest.skip("this CPU (or build) has no vector path")
    for key, offset in ((PhiloxKey(2**63 + 11, 9, 1), 0), (PhiloxKey(7, 2**32 - 1, 5), 2**33 + 3)):
        draws = {}
        for path in each_path:
            _cpu.set_isa(path)
            draws[path] = _cpu.philox_normal(2**20 + 5, key, offset=offset)
        for path in each_path[1:]:
            assert torch.equal(draws[path], draws["scalar"]), path


def test_every_path_is_the_cuda_header(each_path, host_philox):  # noqa: F811
    key = PhiloxKey(2**40 + 5, 0, 9)
    _, z_host = host_philox([(key.seed, key.step, key.stream, e) for e in range(3001)])
    for path in each_path:
        _cpu.set_isa(path)
        assert torch.equal(philox.normal(3001, key), z_host), path


def test_an_unknown_path_is_refused():
    with pytest.raises(RuntimeError, match="scalar, avx2 or avx512"):
        _cpu.set_isa("sse9")


def test_odd_offsets_are_the_same_elements():
    key = PhiloxKey(99, 1, 2)
    full = _cpu.philox_normal(100, key)
    for offset in (1, 7, 15, 16, 17, 50):  # inside, at and past the 16-element blocks
        assert torch.equal(_cpu.philox_normal(100 - offset, key, offset=offset), full[offset:])
        assert torch.equal(_cpu.philox_normal(3, key, offset=offset), full[offset : offset + 3])


def test_add_normal_is_out_plus_std_z():
    key = PhiloxKey(5, 6, 7)
    base = torch.randn(33, 17)
    out = philox.add_normal_(base.clone(), 0.37, key)
    assert torch.equal(out, base + 0.37 * philox.normal(base.numel(), key).view(base.shape))


def test_independent_of_the_thread_count():
    key = PhiloxKey(2024, 3, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = philox.normal(300_001, key)
        torch.set_num_threads(max(2, threads))
        many = philox.normal(300_001, key)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_the_reference_runs_where_the_kernel_cannot_be_built(monkeypatch):
    monkeypatch.setattr(_cpu, "_attempted", False)
    monkeypatch.setattr(_cpu, "_module", None)
    monkeypatch.setattr(_cpu, "_reason", None)
    monkeypatch.setenv("DPKERNELS_DISABLE_CPU_KERNEL", "1")
    assert not _cpu.available() and "DPKERNELS_DISABLE_CPU_KERNEL" in _cpu.why_unavailable()
    import dpkernels

    assert dpkernels.backends(load_cuda=False)["cpu"]["available"] is False
    key = PhiloxKey(1, 2, 3)
    assert torch.equal(philox.normal(101, key), philox_normal(101, key))


def test_fused_torch_paths_draw_the_kernels_noise():
    """The torch backend's clipped sums (here: clip-sum-noise) add exactly normal()'s draws."""
    from dpkernels import functional

    key = PhiloxKey(random.Random(1).getrandbits(64), 4, 5)
    g = torch.randn(6, 50)
    c = torch.rand(6)
    clean = functional.clip_sum_noise(g, c, noise_std=0.0, generator=key, backend="torch")
    noisy = functional.clip_sum_noise(g, c, noise_std=0.8, generator=key, backend="torch")
    assert torch.equal(noisy, clean + 0.8 * philox.normal(50, key))


# ------------------------------------------------------------------ patches ---------------

GEOMETRIES = [  # (spatial dims, kernel, stride, padding, dilation, groups, padding mode)
    (2, 3, 1, 1, 1, 1, "zeros"),
    (2, 3, 2, 1, 1, 1, "zeros"),
    (2, (2, 5), 1, "same", 1, 1, "zeros"),
    (2, (2, 5), (1, 3), (1, 2), 1, 1, "zeros"),
    (2, 3, 1, "same", 2, 4, "zeros"),
    (2, 5, 2, 2, 2, 2, "reflect"),
    (2, 2, 1, "same", 3, 4, "circular"),
    (2, 1, 1, 0, 1, 1, "zeros"),
    (2, 3, 3, "valid", 1, 8, "replicate"),
    (2, 4, 1, (0, 3), 1, 1, "zeros"),
    (1, 3, 1, 1, 1, 1, "zeros"),
    (1, 4, 2, "valid", 2, 2, "zeros"),
    (1, 5, 1, "same", 1, 1, "reflect"),
    (1, 2, 1, "same", 1, 8, "circular"),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_conv_patches_are_the_reference_exactly(geometry, dtype, layout):
    dims, k, stride, padding, dilation, groups, mode = geometry
    C, B = 8, 3
    kernel = (k,) if dims == 1 and isinstance(k, int) else ((k, k) if isinstance(k, int) else k)
    geo = conv_patches.ConvGeometry.from_args((16, C // groups, *kernel), stride, padding, dilation, groups, mode)
    x = torch.randn(B, C, *((13,) if dims == 1 else (11, 7)), generator=torch.Generator().manual_seed(0)).to(dtype)
    if layout == "channels_last":
        x = x.transpose(1, -1).contiguous().transpose(1, -1)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    got = conv_patches.input_patches(x, geo)
    ref = conv_patches.input_patches_reference(x, geo)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, ref)


def test_conv_patches_are_refused_with_bad_arguments():
    with pytest.raises(RuntimeError, match="groups must divide"):
        _cpu.load().conv_patches(torch.randn(2, 6, 5, 5), 4, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3)
    with pytest.raises(RuntimeError, match="must be a \\(B, C, H, W\\) CPU tensor"):
        _cpu.load().conv_patches(torch.randn(2, 6, 5), 1, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3)


def test_a_built_wheel_carries_the_sources(tmp_path):
    """A non-editable install JIT-compiles the CPU kernels from dpkernels/_csrc (setup.py copies csrc/ there)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "DPKERNELS_NO_CUDA_BUILD": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("dpkernels-*.whl"))).namelist())
    for source in _cpu.SOURCES + ("cpu_kernels.h", "philox.cuh"):
        assert f"dpkernels/_csrc/{source}" in names
