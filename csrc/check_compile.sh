#!/usr/bin/env bash
# Compile checks of the CUDA sources; needs nvcc but no GPU.
#
#   csrc/check_compile.sh            # from anywhere
#   ARCHS="80 90" csrc/check_compile.sh
#
# 1. nvcc: csrc/clip_sum_noise.cu -> object for each sm_XX in $ARCHS (default 90), with the
#    flags torch's extension builder adds (-std=c++20, no-half-conversion macros, ...) plus
#    -O3 -lineinfo, once without and once with --use_fast_math; ptxas resource usage printed.
# 2. PTX guard: the noise path must contain no approximate transcendental (lg2/ex2/sin/cos
#    .approx) even under --use_fast_math (csrc/philox.cuh promises flag-independent normals).
# 3. csrc/philox_host_check.cpp (the device header compiled for the host by nvcc -x cu): Philox
#    known-answer vectors; if python + torch + dpkernels import, also a comparison of integers
#    (exact) and normals (<= 1e-5) against dpkernels/ops/philox.py.
#    csrc/clip_sum_noise_host_check.cu: the kernel body run block by block on the CPU against a
#    float64 reference (all vector widths, misaligned bases, B*n > 2^31 via untouched mappings).
# 4. g++ -c of csrc/bindings.cpp against the installed torch's headers, if torch is importable,
#    and a check that the launcher symbols it needs are those clip_sum_noise.cu defines. (With a
#    CPU-only torch, c10/cuda/impl/cuda_cmake_macros.h is absent and is skipped with
#    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE; it only defines export macros.)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python3}"
ARCHS="${ARCHS:-90}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command -v "$NVCC" >/dev/null || { echo "check_compile: nvcc not found (set NVCC=...)" >&2; exit 2; }
echo "== $("$NVCC" --version | tail -n 1)"

torch_nvcc_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
                  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
                  --expt-relaxed-constexpr)

# 1. the kernels
for arch in $ARCHS; do
  for fast in "" "--use_fast_math"; do
    echo "== nvcc clip_sum_noise.cu sm_${arch} ${fast:-(no fast math)}"
    "$NVCC" -std=c++20 -O3 -lineinfo $fast -arch="sm_${arch}" "${torch_nvcc_flags[@]}" \
      -Xcompiler -Wall -Xcompiler -Wextra -Xptxas -warn-spills -I "$here" \
      -c "$here/clip_sum_noise.cu" -o "$work/clip_sum_noise_${arch}.o"
  done
  "$NVCC" -std=c++20 -O3 -arch="sm_${arch}" "${torch_nvcc_flags[@]}" -Xptxas -v -I "$here" \
    -c "$here/clip_sum_noise.cu" -o "$work/v.o" 2>&1 |
    grep -E "Compiling entry|registers" | sed -E "s/_ZN3dpk.*_GLOBAL__N__.*_cu_[0-9a-f]{8}[0-9]+//" || true
done

# 2. no approximate transcendentals, even with --use_fast_math
arch0="${ARCHS%% *}"
"$NVCC" -std=c++20 -O3 --use_fast_math -arch="sm_${arch0}" "${torch_nvcc_flags[@]}" -I "$here" \
  -ptx "$here/clip_sum_noise.cu" -o "$work/clip_sum_noise.ptx"
if grep -qE "(lg2|ex2|sin|cos)\.approx" "$work/clip_sum_noise.ptx"; then
  echo "check_compile: FAIL: approximate transcendental in the PTX:" >&2
  grep -nE "(lg2|ex2|sin|cos)\.approx" "$work/clip_sum_noise.ptx" | head >&2
  exit 1
fi
echo "== PTX (--use_fast_math): no lg2/ex2/sin/cos.approx in the noise path"

# 3. the Philox header on the host
echo "== philox_host_check (nvcc -x cu, host code)"
"$NVCC" -std=c++17 -O2 -x cu -I "$here" "$here/philox_host_check.cpp" -o "$work/philox_host_check"
"$work/philox_host_check"
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$work/philox_host_check" <<'EOF'
import random, subprocess, sys
import torch
from dpkernels.ops.philox import MASK32, PhiloxKey, philox4x32_10, philox_normal

rng = random.Random(1234)
# sequential blocks (normals compared with philox_normal of the block) + random counters (integers)
blocks = [PhiloxKey(12345, 7, 3), PhiloxKey(2**64 - 1, 2**32 - 1, 2**32 - 1), PhiloxKey(rng.getrandbits(64), 1, 0)]
n_block = 1000
cases = [(k.seed, k.step, k.stream, j) for k in blocks for j in range(n_block)]
for _ in range(2000):
    cases.append((rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(32),
                  rng.choice([rng.getrandbits(20), rng.getrandbits(40), 2**32 - 1, 2**32, rng.getrandbits(64)])))
text = "\n".join(" ".join(map(str, c)) for c in cases)
out = subprocess.run([sys.argv[1], "--stdin"], input=text, capture_output=True, text=True, check=True).stdout.split("\n")
got = [line.split() for line in out[: len(cases)]]
ints = torch.tensor([[int(v) for v in f[:4]] for f in got], dtype=torch.int64)
# reference integers, one draw at a time (every random case has its own key)
bad = 0
for row, (seed, step, stream, elem) in enumerate(cases):
    key = PhiloxKey(seed, step, stream)
    t = lambda v: torch.tensor([v], dtype=torch.int64)
    x = torch.cat(philox4x32_10(t(elem & MASK32), t(elem >> 32), t(step), t(stream), key.seed_lo, key.seed_hi))
    bad += int(not torch.equal(x, ints[row]))
if bad:
    sys.exit(f"check_compile: FAIL: Philox integers differ from dpkernels/ops/philox.py in {bad} of {len(cases)} draws")
max_dz = 0.0
for b, key in enumerate(blocks):
    z = torch.tensor([float.fromhex(f[4]) for f in got[b * n_block : (b + 1) * n_block]], dtype=torch.float32)
    max_dz = max(max_dz, float((z - philox_normal(n_block, key)).abs().max()))
if max_dz > 1e-5:
    sys.exit(f"check_compile: FAIL: normals differ from dpkernels/ops/philox.py by up to {max_dz}")
print(f"== philox.cuh on the host matches dpkernels/ops/philox.py: {len(cases)} draws, integers exact, "
      f"normals max |dz| = {max_dz:.3g}")
EOF
else
  echo "== (python/torch not importable: skipped the comparison with dpkernels/ops/philox.py)"
fi

# 3b. the kernel body emulated on the host (tiling, vector widths, int64 index math)
echo "== clip_sum_noise_host_check (kernel body of clip_sum_noise_impl.cuh emulated on the CPU)"
"$NVCC" -std=c++17 -O2 -Xcompiler -fno-strict-aliasing -I "$here" "$here/clip_sum_noise_host_check.cu" \
  -o "$work/clip_sum_noise_host_check"
"$work/clip_sum_noise_host_check" | tail -n 5

# 4. the bindings against torch's headers
if incs="$("$PYTHON" -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join(c.include_paths() + [sysconfig.get_paths()['include']]))" 2>/dev/null)"; then
  cuda_inc=""
  for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
    if [ -n "$d" ] && [ -f "$d/include/cuda_runtime_api.h" ]; then cuda_inc="$d/include"; break; fi
  done
  extra=()
  first_inc="${incs%% *}"
  if [ ! -f "$first_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    extra+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  fi
  isys=()
  for d in $incs ${cuda_inc:+$cuda_inc}; do isys+=(-isystem "$d"); done
  echo "== $CXX -c bindings.cpp (torch headers${extra:+, CPU-only torch: ${extra[*]}})"
  "$CXX" -std=c++20 -O0 -fPIC -c -Wall -Wextra -DTORCH_EXTENSION_NAME=_C \
    -DTORCH_API_INCLUDE_EXTENSION_H "${extra[@]}" -I "$here" "${isys[@]}" "$here/bindings.cpp" \
    -o "$work/bindings.o"
  if command -v nm >/dev/null; then
    # the launchers bindings.cpp calls are the ones clip_sum_noise.cu defines (same signatures)
    wanted="$(nm -C "$work/bindings.o" | sed -n 's/^ *U \(dpk::launch_.*\)$/\1/p' | sort)"
    defined="$(nm -C "$work/clip_sum_noise_${arch0}.o" | sed -n 's/^[0-9a-f]* T \(dpk::launch_.*\)$/\1/p' | sort)"
    missing="$(comm -23 <(echo "$wanted") <(echo "$defined"))"
    if [ -z "$wanted" ] || [ -n "$missing" ]; then
      echo "check_compile: FAIL: launchers used by bindings.cpp but not defined by clip_sum_noise.cu:" >&2
      echo "${missing:-(none found)}" >&2
      exit 1
    fi
    echo "== bindings.o <-> clip_sum_noise.o: $(echo "$wanted" | wc -l) launcher symbols match"
  fi
else
  echo "== (torch not importable: skipped the syntax check of bindings.cpp)"
fi

echo "check_compile: OK"
