"""Tests of the CUDA extension: the loader (CPU), csrc/philox.cuh on the host (CPU, needs a C++
compiler) and the kernels against the torch reference (``gpu``-marked, need a CUDA GPU)."""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import dpkernels._cuda as cuda_ext
from dpkernels.ops.philox import MASK32, PhiloxKey, philox4x32_10, philox_normal

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference_words(key: PhiloxKey, elements: list[int]) -> torch.Tensor:
    """int64 (len, 4) Philox words of the reference for arbitrary 64-bit element indices."""
    c0 = torch.tensor([e & MASK32 for e in elements], dtype=torch.int64)
    c1 = torch.tensor([(e >> 32) & MASK32 for e in elements], dtype=torch.int64)
    c2 = torch.full_like(c0, key.step)
    c3 = torch.full_like(c0, key.stream)
    return torch.stack(philox4x32_10(c0, c1, c2, c3, key.seed_lo, key.seed_hi), dim=1)


# ---------------------------------------------------------------------------------------------
# CPU: the loader
# ---------------------------------------------------------------------------------------------


def test_import_does_not_compile_or_load():
    code = (
        "import sys\n"
        "import torch.utils.cpp_extension as ce\n"
        "def boom(*a, **k):\n"
        "    raise AssertionError('cpp_extension.load called at import')\n"
        "ce.load = boom\n"
        "import dpkernels._cuda as m\n"
        "assert not m.attempted()\n"
        "assert 'dpkernels._C' not in sys.modules and 'dpkernels_C' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.fixture
def fresh_loader():
    """Forget the cached load outcome before and after the test."""
    cuda_ext._reset()
    yield cuda_ext
    cuda_ext._reset()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_unavailable_without_gpu(fresh_loader, monkeypatch):
    from torch.utils import cpp_extension

    def boom(*a, **k):
        raise AssertionError("must not try to compile without a GPU")

    monkeypatch.setattr(cpp_extension, "load", boom)
    assert cuda_ext.available() is False
    reason = cuda_ext.why_unavailable()
    assert isinstance(reason, str) and reason
    assert "CUDA" in reason or "GPU" in reason
    assert cuda_ext.attempted()
    with pytest.raises(RuntimeError, match="dpkernels CUDA extension unavailable"):
        cuda_ext.load()
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda_ext.clip_sum_noise(torch.zeros(2, 3), torch.ones(2), 1.0, PhiloxKey(0))
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda_ext.philox_normal(4, PhiloxKey(0))
    assert cuda_ext.why_unavailable() == reason  # cached


def test_disabled_by_environment(fresh_loader, monkeypatch):
    monkeypatch.setenv("DPKERNELS_DISABLE_CUDA", "1")
    assert cuda_ext.available() is False
    assert "DPKERNELS_DISABLE_CUDA" in cuda_ext.why_unavailable()


def _no_prebuilt() -> bool:
    import importlib.util

    return importlib.util.find_spec("dpkernels._C") is None


@pytest.mark.skipif(not _no_prebuilt(), reason="a prebuilt dpkernels._C is installed")
def test_reason_when_sources_missing(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_ext, "_environment_reason", lambda: None)
    monkeypatch.setattr(cuda_ext, "csrc_dir", lambda: tmp_path / "csrc")
    assert cuda_ext.available() is False
    reason = cuda_ext.why_unavailable()
    assert "CUDA sources are not at" in reason and "reinstall from a checkout" in reason


@pytest.mark.skipif(not _no_prebuilt(), reason="a prebuilt dpkernels._C is installed")
def test_reason_when_no_nvcc(fresh_loader, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cuda_ext, "_environment_reason", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert cuda_ext.available() is False
    assert "nvcc" in cuda_ext.why_unavailable()


@pytest.mark.skipif(not _no_prebuilt(), reason="a prebuilt dpkernels._C is installed")
def test_reason_when_compile_fails(fresh_loader, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        assert kwargs["name"] == "dpkernels_C"
        assert [Path(s).name for s in kwargs["sources"]] == ["bindings.cpp", "clip_sum_noise.cu"]
        assert "--use_fast_math" not in kwargs["extra_cuda_cflags"]
        raise RuntimeError("Error building extension 'dpkernels_C': boom")

    monkeypatch.setattr(cuda_ext, "_environment_reason", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    assert cuda_ext.available() is False
    reason = cuda_ext.why_unavailable()
    assert "JIT compilation" in reason and "boom" in reason
    with pytest.raises(RuntimeError, match="boom"):
        cuda_ext.load()


# ---------------------------------------------------------------------------------------------
# CPU: csrc/philox.cuh compiled for the host, against dpkernels/ops/philox.py
# ---------------------------------------------------------------------------------------------


def _host_compiler() -> list[str] | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return [nvcc, "-std=c++17", "-O2", "-x", "cu"]
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return [shutil.which(cxx), "-std=c++17", "-O2"]
    return None


@pytest.fixture(scope="module")
def host_philox(tmp_path_factory):
    compiler = _host_compiler()
    if compiler is None:
        pytest.skip("no nvcc or C++ compiler to build csrc/philox_host_check.cpp")
    exe = tmp_path_factory.mktemp("philox_host") / "philox_host_check"
    r = subprocess.run(
        compiler + ["-I", str(CSRC), str(CSRC / "philox_host_check.cpp"), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"compiling philox_host_check failed:\n{r.stdout}\n{r.stderr}"

    def run(cases: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        text = "\n".join(f"{s} {st} {sm} {e}" for (s, st, sm, e) in cases)
        out = subprocess.run([str(exe), "--stdin"], input=text, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr  # also fails on a known-answer-vector mismatch
        rows = [line.split() for line in out.stdout.strip().split("\n")]
        assert len(rows) == len(cases)
        words = torch.tensor([[int(v) for v in r[:4]] for r in rows], dtype=torch.int64)
        z = torch.tensor([float.fromhex(r[4]) for r in rows], dtype=torch.float32)
        return words, z

    return run


def test_host_philox_words_match_reference(host_philox):
    rng = random.Random(20240611)
    elements = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1]
    elements += [rng.getrandbits(b) for b in (8, 31, 33, 48, 64) for _ in range(40)]
    keys = [PhiloxKey(0), PhiloxKey(2**64 - 1, 2**32 - 1, 2**32 - 1), PhiloxKey(rng.getrandbits(64), 17, 3)]
    for key in keys:
        words, _ = host_philox([(key.seed, key.step, key.stream, e) for e in elements])
        assert torch.equal(words, _reference_words(key, elements))


def test_host_philox_normals_match_reference(host_philox):
    n = 4096
    for key in (PhiloxKey(12345, 7, 3), PhiloxKey(2**64 - 1, 2**32 - 1, 2**32 - 1), PhiloxKey(2**40 + 5, 0, 9)):
        _, z = host_philox([(key.seed, key.step, key.stream, j) for j in range(n)])
        ref = philox_normal(n, key)
        assert torch.isfinite(z).all()
        assert (z - ref).abs().max().item() <= 1e-5


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (no GPU needed)")
def test_host_emulated_kernel_body(tmp_path):
    """The kernel body (clip_sum_noise_impl.cuh) run block by block on the CPU by
    csrc/clip_sum_noise_host_check.cu: every vector width, misaligned bases, B = 0 / 1 / odd,
    tail tiles, exact no-noise sums, and B * n > 2^31 (columns > 2^31, elements > 2^32) through
    untouched memory mappings, which fails if any of the index math were 32-bit."""
    exe = tmp_path / "clip_sum_noise_host_check"
    r = subprocess.run(
        [
            shutil.which("nvcc"),
            "-std=c++17",
            "-O1",
            "-Xcompiler",
            "-fno-strict-aliasing",
            "-I",
            str(CSRC),
            str(CSRC / "clip_sum_noise_host_check.cu"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"compiling clip_sum_noise_host_check failed:\n{r.stdout}\n{r.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all cases OK" in run.stdout
    assert "B*n" in run.stdout  # the 64-bit cases ran (or said why they were skipped)


def test_index_math_is_int64_in_source():
    """A cheap guard next to the emulation above: the kernel's index variables are int64_t."""
    body = " ".join((CSRC / "clip_sum_noise_impl.cuh").read_text().split())  # whitespace-normalised
    for decl in (
        "const int64_t col = tile * kTile",
        "const int64_t row_stride = step * n",
        "const T* ptr = g + i * n + col",
        "const int64_t j = tile0 + t",
        "philox_normal(key, static_cast<uint64_t>(j))",
    ):
        assert decl in body, decl
    assert "int64_t B, int64_t n, int64_t tile," in body  # accumulate(): B, n and the tile index
    assert "T* __restrict__ out, int64_t n, int64_t tile," in body  # epilogue(): n and the tile index


# ---------------------------------------------------------------------------------------------
# GPU: the kernels
# ---------------------------------------------------------------------------------------------

KEYS = [PhiloxKey(0), PhiloxKey(0x0123456789ABCDEF, 5, 11), PhiloxKey(2**64 - 1, 2**32 - 1, 2**32 - 1)]


@pytest.fixture(scope="module")
def ext():
    # On a GPU machine an unloadable extension is a failure, not a skip: the reason is reported.
    return cuda_ext.load()


@pytest.mark.gpu
@needs_gpu
def test_gpu_loader_reports_available(ext):
    assert cuda_ext.available() and cuda_ext.why_unavailable() is None
    assert cuda_ext.load() is cuda_ext.load()
    assert all(hasattr(ext, f) for f in ("clip_sum_noise", "philox_normal", "philox4x32"))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("key", KEYS, ids=["zero", "mixed", "max"])
@pytest.mark.parametrize("offset", [0, 2**32 - 1000, 2**64 - 500], ids=["0", "2^32", "2^64"])
def test_gpu_philox_words_match_reference(ext, key, offset):
    n = 3000  # the 2^32 and 2^64 offsets cross the high-word / wrap-around boundaries
    got = cuda_ext.philox4x32(n, key, offset=offset).cpu()
    elements = [(offset + j) % 2**64 for j in range(n)]
    assert torch.equal(got, _reference_words(key, elements))


@pytest.mark.gpu
@needs_gpu
def test_gpu_philox_known_answer_vector(ext):
    # Random123 KAT: ctr = (243f6a88, 85a308d3, 13198a2e, 03707344), key = (a4093822, 299f31d0)
    key = PhiloxKey((0x299F31D0 << 32) | 0xA4093822, step=0x13198A2E, stream=0x03707344)
    got = cuda_ext.philox4x32(1, key, offset=(0x85A308D3 << 32) | 0x243F6A88).cpu()
    assert got.tolist() == [[0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("key", KEYS, ids=["zero", "mixed", "max"])
def test_gpu_philox_normal_matches_reference(ext, key):
    n = 100_003
    z = cuda_ext.philox_normal(n, key)
    assert z.dtype == torch.float32 and z.shape == (n,) and z.is_cuda
    ref = philox_normal(n, key)
    assert (z.cpu() - ref).abs().max().item() <= 1e-5
    # the reference run on the GPU too (torch's CUDA log/cos)
    assert (z - philox_normal(n, key, device="cuda")).abs().max().item() <= 1e-5
    # the raw extension entry point, device given without an index
    z2 = ext.philox_normal(n, key.seed_lo, key.seed_hi, key.step, key.stream, torch.device("cuda"))
    assert torch.equal(z, z2)
    # offset continues the same sequence
    tail = cuda_ext.philox_normal(100, key, offset=n - 100)
    assert torch.equal(tail, z[-100:])


@pytest.mark.gpu
@needs_gpu
def test_gpu_philox_normal_empty(ext):
    assert cuda_ext.philox_normal(0, PhiloxKey(1)).shape == (0,)
    assert cuda_ext.philox4x32(0, PhiloxKey(1)).shape == (0, 4)


# (B, param shape): odd sizes, every vector width (fp32: n % 4, bf16/fp16: n % 8), B = 0 and 1,
# B not a multiple of the rows per block (16) nor of the 4-row unroll, a tail tile, many tiles.
SHAPES = [
    (1, (1,)),
    (1, (7,)),
    (3, (7,)),
    (2, ()),
    (0, (9,)),
    (5, (1000,)),
    (4, (13, 17)),
    (33, (768,)),
    (17, (770,)),
    (7, (1031,)),
    (19, (256,)),
    (19, (260,)),
    (19, (258,)),
    (19, (257,)),
    (1000, (24,)),
    (4097, (3,)),
    (64, (4096,)),
    (6, (40_000,)),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_REL = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _expected(g: torch.Tensor, c: torch.Tensor, noise_std: float, key: PhiloxKey) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference (n,) and the float64 sum of |c_i g_ij| (for the accumulation tolerance)."""
    g64 = g.detach().double().cpu()
    c64 = c.detach().double().cpu()
    terms = c64[:, None] * g64
    exp = terms.sum(0)
    if noise_std != 0.0:
        exp = exp + noise_std * philox_normal(g.shape[1], key).double()
    return exp, terms.abs().sum(0)


def _check_close(out: torch.Tensor, g2d: torch.Tensor, c: torch.Tensor, noise_std: float, key: PhiloxKey) -> None:
    exp, sum_abs = _expected(g2d, c, noise_std, key)
    got = out.detach().double().cpu().reshape(-1)
    # float32 accumulation (<= B/16 + 16 roundings of 2^-24, with slack) + the rounding of the
    # output to its dtype + float32 log/cos in the noise (1e-5 per unit of noise_std)
    tol = 5e-6 * sum_abs + OUT_REL[out.dtype] * exp.abs() + 1e-5 * noise_std + 1e-30
    err = (got - exp).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item()} at {(err - tol).argmax().item()}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,shape", SHAPES, ids=str)
@pytest.mark.parametrize("noise_std", [0.0, 1.7])
def test_gpu_clip_sum_noise_matches_reference(ext, dtype, batch, shape, noise_std):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((batch, shape, str(dtype))).encode()))
    per_example = torch.randn((batch, *shape), generator=gen).to(dtype).cuda()
    clip = torch.rand(batch, generator=gen).cuda()
    key = PhiloxKey(0xDEADBEEF12345678, step=3, stream=len(shape) + 2)
    out = cuda_ext.clip_sum_noise(per_example, clip, noise_std, key)
    assert out.shape == torch.Size(shape) and out.dtype == dtype and out.device == per_example.device
    n = math.prod(shape)
    _check_close(out, per_example.reshape(batch, n), clip, noise_std, key)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [256, 1000, 1024 + 3])
@pytest.mark.parametrize("shift", [1, 2])
def test_gpu_misaligned_base_pointer(ext, dtype, n, shift):
    # a contiguous view `shift` elements into its storage: rows are not 16-byte aligned, so the
    # kernel must fall back to narrower loads (scalar, or 2 elements at a time)
    batch = 9
    flat = torch.randn(batch * n + shift, device="cuda").to(dtype)
    per_example = flat[shift:].view(batch, n)
    assert per_example.data_ptr() % 16 != 0
    clip = torch.rand(batch, device="cuda")
    key = PhiloxKey(77, 1, 2)
    out = cuda_ext.clip_sum_noise(per_example, clip, 0.5, key)
    _check_close(out, per_example, clip, 0.5, key)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n", [(1, 1), (4, 7), (5, 1032), (40, 96)])
def test_gpu_zero_noise_is_the_exact_clipped_sum(ext, dtype, batch, n):
    # small integers times powers of two: every partial sum is exact in float32 and the result
    # exact in the output dtype, whatever the summation order, so equality must be exact
    gen = torch.Generator().manual_seed(batch * 1000 + n)
    gmax = max(1, min(3, 63 // batch))
    g = torch.randint(-gmax, gmax + 1, (batch, n), generator=gen).to(dtype)
    c = 2.0 ** -torch.randint(0, 3, (batch,), generator=gen).float()
    expected = (c.double()[:, None] * g.double()).sum(0)
    # multiples of 1/4 below 64 in magnitude: at most 8 significant bits, exact in bfloat16
    assert expected.abs().max() < 64
    out = cuda_ext.clip_sum_noise(g.cuda(), c.cuda(), 0.0, PhiloxKey(99, 1, 1))
    assert torch.equal(out.cpu().double(), expected)
    # and no noise: any key gives the same result
    assert torch.equal(out, cuda_ext.clip_sum_noise(g.cuda(), c.cuda(), 0.0, PhiloxKey(5, 6, 7)))


@pytest.mark.gpu
@needs_gpu
def test_gpu_noise_only_and_determinism(ext):
    n = 10_000
    key = PhiloxKey(31337, 4, 1)
    g = torch.zeros(1, n, device="cuda")
    c = torch.ones(1, device="cuda")
    out = cuda_ext.clip_sum_noise(g, c, 2.0, key)
    assert torch.equal(out, cuda_ext.clip_sum_noise(g, c, 2.0, key))  # reproducible
    assert ((out.cpu() - 2.0 * philox_normal(n, key)).abs() <= 2e-5).all()
    assert torch.equal(out, 2.0 * cuda_ext.philox_normal(n, key))
    other = cuda_ext.clip_sum_noise(g, c, 2.0, PhiloxKey(31337, 4, 2))  # another stream
    assert (out != other).float().mean() > 0.99
    # B = 0: the noise alone
    empty = cuda_ext.clip_sum_noise(torch.zeros(0, n, device="cuda"), torch.zeros(0, device="cuda"), 2.0, key)
    assert torch.equal(empty, out)
    # n = 0
    none = cuda_ext.clip_sum_noise(torch.zeros(3, 0, device="cuda"), torch.ones(3, device="cuda"), 1.0, key)
    assert none.shape == (0,)


@pytest.mark.gpu
@needs_gpu
def test_gpu_wrapper_handles_layouts(ext):
    key = PhiloxKey(8, 0, 0)
    base = torch.randn(6, 10, 12, device="cuda")
    per_example = base.transpose(1, 2)  # (6, 12, 10), not contiguous
    clip = torch.rand(6, device="cuda", dtype=torch.float64)  # cast to float32 by the wrapper
    out = cuda_ext.clip_sum_noise(per_example, clip, 0.3, key)
    assert out.shape == (12, 10)
    _check_close(out, per_example.reshape(6, 120), clip.float(), 0.3, key)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bad_inputs(ext):
    g = torch.randn(4, 8, device="cuda")
    c = torch.rand(4, device="cuda")
    args = (0.0, 1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="per_example must be a CUDA tensor"):
        ext.clip_sum_noise(g.cpu(), c, *args)
    with pytest.raises(RuntimeError, match="clip_factors must be a CUDA tensor"):
        ext.clip_sum_noise(g, c.cpu(), *args)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ext.clip_sum_noise(g.view(4, 2, 4), c, *args)
    with pytest.raises(RuntimeError, match=r"shape \(B,\)"):
        ext.clip_sum_noise(g, torch.rand(5, device="cuda"), *args)
    with pytest.raises(RuntimeError, match=r"shape \(B,\)"):
        ext.clip_sum_noise(g, c.view(4, 1), *args)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.clip_sum_noise(g.double(), c, *args)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.clip_sum_noise(g.to(torch.int32), c, *args)
    with pytest.raises(RuntimeError, match="clip_factors must be float32"):
        ext.clip_sum_noise(g, c.double(), *args)
    with pytest.raises(RuntimeError, match="per_example must be contiguous"):
        ext.clip_sum_noise(torch.randn(8, 4, device="cuda").t(), c, *args)
    with pytest.raises(RuntimeError, match="clip_factors must be contiguous"):
        ext.clip_sum_noise(g, torch.rand(8, device="cuda")[::2], *args)
    for bad_std in (-1.0, float("nan"), float("inf"), 1e39):
        with pytest.raises(RuntimeError, match="noise_std"):
            ext.clip_sum_noise(g, c, bad_std, 1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="seed_lo"):
        ext.clip_sum_noise(g, c, 1.0, 2**32, 0, 0, 0)
    with pytest.raises(RuntimeError, match="seed_hi"):
        ext.clip_sum_noise(g, c, 1.0, 0, -1, 0, 0)
    with pytest.raises(RuntimeError, match="step"):
        ext.clip_sum_noise(g, c, 1.0, 0, 0, 2**32, 0)
    with pytest.raises(RuntimeError, match="stream"):
        ext.clip_sum_noise(g, c, 1.0, 0, 0, 0, -5)
    with pytest.raises(RuntimeError, match="device must be a CUDA device"):
        ext.philox_normal(4, 0, 0, 0, 0, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        ext.philox_normal(-1, 0, 0, 0, 0, torch.device("cuda"))
    # the wrapper
    with pytest.raises(RuntimeError, match="per_example must be a CUDA tensor"):
        cuda_ext.clip_sum_noise(g.cpu(), c, 1.0, PhiloxKey(0))
    with pytest.raises(ValueError):
        cuda_ext.clip_sum_noise(torch.tensor(1.0, device="cuda"), c, 1.0, PhiloxKey(0))
    with pytest.raises(ValueError, match="offset"):
        cuda_ext.philox_normal(4, PhiloxKey(0), offset=-1)
    with pytest.raises(TypeError):
        cuda_ext.clip_sum_noise(g, c, 1.0, "not a key")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_different_devices_rejected(ext):
    g = torch.randn(4, 8, device="cuda:0")
    c = torch.rand(4, device="cuda:1")
    with pytest.raises(RuntimeError, match="same device"):
        ext.clip_sum_noise(g, c, 0.0, 0, 0, 0, 0)
    out = cuda_ext.clip_sum_noise(g.to("cuda:1"), c, 0.0, PhiloxKey(0))  # runs on cuda:1
    assert out.device == torch.device("cuda:1")
    _check_close(out, g, c, 0.0, PhiloxKey(0))


@pytest.mark.gpu
@needs_gpu
def test_gpu_64bit_indexing(ext):
    # B * n > 2^31 (and each row offset i * n > 2^31 for i >= 2): with 32-bit index math the
    # last rows would be read from the wrong place. bf16 zeros except the last columns.
    batch, n = 3, 2**30 + 8  # n % 8 == 0: the 128-bit load path
    need = batch * n * 2 + n * 2
    free, _ = torch.cuda.mem_get_info()
    if free < need + 2 * 2**30:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    g = torch.zeros(batch, n, device="cuda", dtype=torch.bfloat16)
    vals = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [100.0, 200.0, 300.0]], dtype=torch.bfloat16)
    g[:, -3:] = vals.cuda()
    g[2, 5] = 7.0
    c = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    out = cuda_ext.clip_sum_noise(g, c, 0.0, PhiloxKey(0))
    del g
    assert out[-3:].float().cpu().tolist() == [31.0, 62.0, 93.0]
    assert out[5].item() == 1.75
    out[5] = 0
    out[-3:] = 0
    assert out.count_nonzero().item() == 0
