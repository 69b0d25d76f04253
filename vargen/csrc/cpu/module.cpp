// The CPU extension's Python module and dispatcher ops (compiled graphs call the ops without a trip through Python).
#include <torch/extension.h>

#include "kernels.h"

TORCH_LIBRARY(vargen_cpu, m) {
  m.def("stream_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(vargen_cpu, CPU, m) {
  m.impl("stream_linear", &vargen_cpu::linear);
  m.impl("attention", &vargen_cpu::attention);
}
TORCH_LIBRARY_IMPL(vargen_cpu, Meta, m) {
  m.impl("stream_linear", &vargen_cpu::linear_meta);
  m.impl("attention", &vargen_cpu::attention_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vargen CPU kernels: bf16 matmuls and KV-cache attention (AVX-512 BF16), a verify step's sampling";
  m.def("supported", &vargen_cpu::supported, "whether this CPU runs the AVX-512 BF16 kernels");
  m.def("pack_weight", &vargen_cpu::pack_weight, "[N, K] bf16 weight -> the kernel's layout", py::arg("weight"));
  m.def("linear", &vargen_cpu::linear, "x [..., K] @ packed weight^T -> [..., N] bf16", py::arg("x"),
        py::arg("packed"));
  m.def("attention", &vargen_cpu::attention,
        "softmax(q k^T scale, mask) v: q [B, T, H, D], k / v [B, Hk, S, D], mask [B, T, S] -> [B, T, H * D] bf16",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("scale"));
  // eager only: compiled graphs fuse these steps themselves
  m.def("rms_norm", &vargen_cpu::rms_norm, "bf16(bf16(x rsqrt(mean(x^2) + eps)) weight), fp32 inside", py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("rope", &vargen_cpu::rope, "x [B, T, H, D] rotated by rope_factors' cos, sin", py::arg("x"),
        py::arg("cos"), py::arg("sin"));
  m.def("silu_mul", &vargen_cpu::silu_mul, "bf16(bf16(silu(a)) b)", py::arg("a"), py::arg("b"));
  m.def("write_kv", &vargen_cpu::write_kv, "k / v [B, T, H, D] into caches [B, H, L, D] at slots [B, T], in place",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("k"), py::arg("v"));
  m.def("block", &vargen_cpu::block,
        "a LlamaGen block (the ops above in TransformerBlock's order) on x [B, T, dim] with a KV cache -> [B, T, dim]",
        py::arg("x"), py::arg("attention_norm"), py::arg("ffn_norm"), py::arg("eps"), py::arg("wqkv"), py::arg("wo"),
        py::arg("w1"), py::arg("w3"), py::arg("w2"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), py::arg("mask"), py::arg("n_head"), py::arg("n_kv_head"),
        py::arg("scale"));
  // the sampling side of a verify step (fp32, any CPU the module loads on): vargen.ops dispatches to these
  m.def("draw_categorical", &vargen_cpu::draw_categorical,
        "inverse-CDF draw per row of p [R, V] (of max(p - q, 0) where residual) with u [R]", py::arg("p"),
        py::arg("q"), py::arg("residual"), py::arg("u"));
  m.def("verify_window", &vargen_cpu::verify_window, "as vargen.ops.reference.verify_window -> (r [B], x [B])",
        py::arg("probs"), py::arg("q"), py::arg("drafts"), py::arg("coins"), py::arg("valid"), py::arg("noise"),
        py::arg("extra"));
}
