// rspeft_fast._C: the pybind11 module of the native extension.
// Each op's sources live in csrc/<op>/; this file only binds them. CUDA entry points are bound only
// when the CUDA sources were compiled in (RSPEFT_WITH_CUDA), so a CPU-only build references no CUDA symbol.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "triplet/triplet.h"

bool with_cuda() {
#ifdef RSPEFT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Names of the kernels this build contains, "<op>_<device>".
std::vector<std::string> kernels() {
  std::vector<std::string> k = {"weighted_triplet_cpu"};
#ifdef RSPEFT_WITH_CUDA
  k.push_back("weighted_triplet_cuda");
#endif
  return k;
}

namespace {

std::vector<at::Tensor> triplet_forward_cpu(const at::Tensor& img, const at::Tensor& txt,
                                            const c10::optional<at::Tensor>& ids, int64_t row_start,
                                            int64_t row_count, double margin, double gamma, bool max_violation,
                                            bool need_grad, int64_t chunk_elems) {
  TORCH_CHECK(img.device().is_cpu(), "weighted_triplet_forward_cpu: tensors must be on CPU, got ", img.device());
  return rspeft::triplet::forward(img, txt, ids, row_start, row_count, margin, gamma, max_violation, need_grad,
                                  chunk_elems);
}

#ifdef RSPEFT_WITH_CUDA
std::vector<at::Tensor> triplet_forward_cuda(const at::Tensor& img, const at::Tensor& txt,
                                             const c10::optional<at::Tensor>& ids, int64_t row_start,
                                             int64_t row_count, double margin, double gamma, bool max_violation,
                                             bool need_grad, int64_t chunk_elems) {
  TORCH_CHECK(img.device().is_cuda(), "weighted_triplet_forward_cuda: tensors must be on CUDA, got ", img.device());
  return rspeft::triplet::forward(img, txt, ids, row_start, row_count, margin, gamma, max_violation, need_grad,
                                  chunk_elems);
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rspeft_fast native ops (C++ CPU kernels; CUDA kernels when built with nvcc)";
  m.def("with_cuda", &with_cuda, "True when the CUDA sources were compiled in");
  m.def("kernels", &kernels, "names of the kernels in this build, '<op>_<device>'");
  const char* doc =
      "weighted triplet loss of rows [row_start, row_start+row_count) (see csrc/triplet/triplet.h): "
      "(img, txt, ids|None, row_start, row_count, margin, gamma, max_violation, need_grad, chunk_elems) "
      "-> [loss, grad_img, grad_txt]";
  m.def("weighted_triplet_forward_cpu", &triplet_forward_cpu, doc, py::arg("img"), py::arg("txt"), py::arg("ids"),
        py::arg("row_start"), py::arg("row_count"), py::arg("margin"), py::arg("gamma"), py::arg("max_violation"),
        py::arg("need_grad"), py::arg("chunk_elems") = 0);
#ifdef RSPEFT_WITH_CUDA
  m.def("weighted_triplet_forward_cuda", &triplet_forward_cuda, doc, py::arg("img"), py::arg("txt"), py::arg("ids"),
        py::arg("row_start"), py::arg("row_count"), py::arg("margin"), py::arg("gamma"), py::arg("max_violation"),
        py::arg("need_grad"), py::arg("chunk_elems") = 0);
#endif
}
