// rspeft_fast._C: the pybind11 module of the native extension.
// Each op's sources live in csrc/<op>/; this file only binds them.
#include <torch/extension.h>

bool with_cuda() {
#ifdef RSPEFT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rspeft_fast native ops (C++ CPU kernels; CUDA kernels when built with nvcc)";
  m.def("with_cuda", &with_cuda, "True when the CUDA sources were compiled in");
}
