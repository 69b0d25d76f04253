// vargen CPU kernels: the functions the module exports (matmul_bf16.cpp, attention_bf16.cpp, layer_ops_bf16.cpp,
// block_bf16.cpp, sampling_cpu.cpp).
#pragma once
#include <torch/extension.h>

namespace vargen_cpu {

bool supported();
torch::Tensor pack_weight(const torch::Tensor& weight);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed);
torch::Tensor linear_meta(const torch::Tensor& x, const torch::Tensor& packed);
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask, double scale);
torch::Tensor attention_meta(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& mask, double scale);

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor silu_mul(const torch::Tensor& a, const torch::Tensor& b);
void write_kv(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots, const torch::Tensor& k,
              const torch::Tensor& v);
torch::Tensor block(const torch::Tensor& x, const torch::Tensor& attention_norm, const torch::Tensor& ffn_norm,
                    double eps, const torch::Tensor& wqkv, const torch::Tensor& wo, const torch::Tensor& w1,
                    const torch::Tensor& w3, const torch::Tensor& w2, const torch::Tensor& cos,
                    const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache,
                    const torch::Tensor& slots, const torch::Tensor& mask, int64_t n_head, int64_t n_kv_head,
                    double scale);

torch::Tensor draw_categorical(const torch::Tensor& p, const c10::optional<torch::Tensor>& q,
                               const c10::optional<torch::Tensor>& residual, const torch::Tensor& u);
std::tuple<torch::Tensor, torch::Tensor> verify_window(const torch::Tensor& probs, const torch::Tensor& q,
                                                       const torch::Tensor& drafts, const torch::Tensor& coins,
                                                       const torch::Tensor& valid, const torch::Tensor& noise,
                                                       const c10::optional<torch::Tensor>& extra);

}  // namespace vargen_cpu
