// Python bindings of dpkernels' compiled CPU kernels (cpu_kernels.h), loaded as dpkernels._cpu.
#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("philox_normal", &dpk_cpu::philox_normal,
        "float32 normals of elements offset .. offset+numel-1 of a counter block");
  m.def("add_normal_", &dpk_cpu::add_normal_, "out += std * z in place (contiguous float32 CPU tensor)");
  m.def("philox4x32", &dpk_cpu::philox4x32, "the raw Philox-4x32-10 words of counters offset .. offset+numel-1");
  m.def("isa", &dpk_cpu::isa, "the path drawing the normals: avx512, avx2 or scalar");
  m.def("set_isa", &dpk_cpu::set_isa, "use a path (one the CPU runs); returns the path now in use");
  m.def("conv_patches", &dpk_cpu::conv_patches, "(g, B, L, d) patch matrices of a convolution's input");
}
