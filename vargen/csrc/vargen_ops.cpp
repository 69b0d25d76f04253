// Python bindings of vargen's CUDA ops. Shapes, semantics and the PyTorch references they must
// match are documented in vargen/ops/__init__.py and vargen/ops/reference.py.
#include <torch/extension.h>

#include <vector>

namespace vargen {
torch::Tensor sampling_probs_cuda(const torch::Tensor& logits, bool cfg, double cfg_scale, double temperature,
                                  int64_t top_k, double top_p);
std::vector<torch::Tensor> verify_window_cuda(const torch::Tensor& probs, const torch::Tensor& q,
                                              const torch::Tensor& drafts, const torch::Tensor& coins,
                                              const torch::Tensor& valid, const torch::Tensor& noise,
                                              const c10::optional<torch::Tensor>& extra);
torch::Tensor lantern_pooled_mass_cuda(const torch::Tensor& p, const torch::Tensor& drafts,
                                       const torch::Tensor& neighbours, bool lam_mode, double budget_value);
std::vector<torch::Tensor> liif_corners_cuda(const torch::Tensor& feat, const torch::Tensor& coord,
                                             const c10::optional<torch::Tensor>& cell,
                                             const std::vector<double>& shift_rows,
                                             const std::vector<double>& shift_cols);
}  // namespace vargen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vargen CUDA kernels: sampling probabilities, speculative verification, LANTERN pooling, LIIF gather";
  m.def("sampling_probs", &vargen::sampling_probs_cuda,
        "[R or 2R, V] logits -> [R, V] fp32 probs (CFG, temperature, top-k, top-p, softmax)", py::arg("logits"),
        py::arg("cfg"), py::arg("cfg_scale"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"));
  m.def("verify_window", &vargen::verify_window_cuda,
        "accept drafts, find the first rejection, draw the residual or bonus token -> (r [B], x [B])",
        py::arg("probs"), py::arg("q"), py::arg("drafts"), py::arg("coins"), py::arg("valid"), py::arg("noise"),
        py::arg("extra") = py::none());
  m.def("lantern_pooled_mass", &vargen::lantern_pooled_mass_cuda,
        "LANTERN pooled neighbour mass per draft -> [B * T]", py::arg("p"), py::arg("drafts"),
        py::arg("neighbours"), py::arg("lam_mode"), py::arg("budget_value"));
  m.def("liif_corners", &vargen::liif_corners_cuda,
        "LIIF local-ensemble gather -> (inp [S, B, Q, D], areas [S, B, Q])", py::arg("feat"), py::arg("coord"),
        py::arg("cell"), py::arg("shift_rows"), py::arg("shift_cols"));
}
