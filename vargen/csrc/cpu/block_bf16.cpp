// One LlamaGen transformer block of eager bf16 inference in a single call: the same kernels, in the same order, as
// TransformerBlock's modules (RMSNorm, qkv matmul, RoPE, KV-cache write, attention, output matmul, residual add,
// RMSNorm, SwiGLU, residual add), so the output is bit-identical to the module path. What it removes is Python: a
// batch-1 step of the default model spent ~2 ms of its ~3.7 in module calls, dtype checks and views around ~40
// kernel calls of a few microseconds each.
#include "kernels.h"

namespace vargen_cpu {

torch::Tensor block(const torch::Tensor& x, const torch::Tensor& attention_norm, const torch::Tensor& ffn_norm,
                    double eps, const torch::Tensor& wqkv, const torch::Tensor& wo, const torch::Tensor& w1,
                    const torch::Tensor& w3, const torch::Tensor& w2, const torch::Tensor& cos,
                    const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache,
                    const torch::Tensor& slots, const torch::Tensor& mask, int64_t n_head, int64_t n_kv_head,
                    double scale) {
  // x [B, T, dim]; weights packed by pack_weight; caches [B, Hk, L, D]; mask [B, T, S] over the first S slots
  TORCH_CHECK(x.dim() == 3 && n_head > 0 && n_kv_head > 0 && x.size(2) % n_head == 0,
              "vargen_cpu.block: x must be [B, T, dim] with dim a multiple of n_head");
  const int64_t B = x.size(0), T = x.size(1), dim = x.size(2), D = dim / n_head;
  const auto qkv = vargen_cpu::linear(vargen_cpu::rms_norm(x, attention_norm, eps), wqkv);
  TORCH_CHECK(qkv.size(2) == (n_head + 2 * n_kv_head) * D, "vargen_cpu.block: wqkv gives ", qkv.size(2),
              " features, heads need ", (n_head + 2 * n_kv_head) * D);
  const auto qk_in = qkv.narrow(2, 0, (n_head + n_kv_head) * D).view({B, T, n_head + n_kv_head, D});
  const auto qk = vargen_cpu::rope(qk_in, cos, sin);
  const auto q = qk.narrow(2, 0, n_head);
  const auto k = qk.narrow(2, n_head, n_kv_head);
  const auto v = qkv.narrow(2, (n_head + n_kv_head) * D, n_kv_head * D).view({B, T, n_kv_head, D});
  vargen_cpu::write_kv(k_cache, v_cache, slots, k, v);
  const int64_t S = mask.size(2);
  const auto attended = vargen_cpu::attention(q, k_cache.narrow(2, 0, S), v_cache.narrow(2, 0, S), mask, scale);
  const auto h = x + vargen_cpu::linear(attended, wo);
  const auto f = vargen_cpu::rms_norm(h, ffn_norm, eps);
  return h + vargen_cpu::linear(vargen_cpu::silu_mul(vargen_cpu::linear(f, w1), vargen_cpu::linear(f, w3)), w2);
}

}  // namespace vargen_cpu
