// vargen CPU kernels: the functions the module exports (matmul_bf16.cpp, attention_bf16.cpp, layer_ops_bf16.cpp).
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

}  // namespace vargen_cpu
