// vargen CPU kernels: the sampling side of a verify step (the speculative test of a window, the residual or bonus
// draw, the redraws of the next window) in one pass over each row.
//
// In eager mode these steps were ~100 aten ops per verify pass over [window, vocabulary] tensors, plus a window of
// Exp(1) noise (16 x 4096 numbers from each sample's generator) to redraw the next window's drafts: together about
// a fifth of an SJD pass of the default model on the 2-core CPU, time an AR step does not spend. Here each row is
// read once or twice in fp32 with the arithmetic of the PyTorch reference (vargen/ops/reference.py): the inverse-CDF
// draw sums in double, as torch.cumsum does on a CPU, so it agrees to the bit; the residual's normaliser is summed
// in another order than torch.sum, so a draw can differ only where two candidates tie to the last fp32 bit.
// Plain C++ (no AVX-512): the rows are short and the loops are bound by their sums' latency.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace vargen_cpu {

namespace {

// the weights' running sums in double as torch.cumsum, rounded to fp32 into cum (one pass: the sums' latency
// bounds it); returns the double total
template <typename Weight>
double running_sums(const Weight& w, int64_t V, float* cum) {
  double acc = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    acc += static_cast<double>(w(i));
    cum[i] = static_cast<float>(acc);
  }
  return acc;
}

// the first index whose rounded running sum reaches (1 - u) of the total (a token of weight 0 never does: its
// sum equals the one before it)
int64_t inverse_cdf(const float* cum, int64_t V, float u) {
  const float t = (1.0f - u) * cum[V - 1];
  const int64_t i = std::lower_bound(cum, cum + V, t) - cum;
  return i < V ? i : V - 1;
}

}  // namespace

torch::Tensor draw_categorical(const torch::Tensor& p, const c10::optional<torch::Tensor>& q,
                               const c10::optional<torch::Tensor>& residual, const torch::Tensor& u) {
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kFloat && p.is_contiguous(), "p: contiguous fp32 [R, V]");
  const int64_t R = p.size(0), V = p.size(1);
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.numel() == R, "u: contiguous fp32 [R]");
  TORCH_CHECK(q.has_value() == residual.has_value(), "q and residual come together");
  const float* qp = nullptr;
  const bool* rp = nullptr;
  if (q.has_value()) {
    TORCH_CHECK(q->sizes() == p.sizes() && q->scalar_type() == at::kFloat && q->is_contiguous(), "q: like p");
    TORCH_CHECK(residual->scalar_type() == at::kBool && residual->is_contiguous() && residual->numel() == R,
                "residual: contiguous bool [R]");
    qp = q->data_ptr<float>();
    rp = residual->data_ptr<bool>();
  }
  auto out = torch::empty({R}, p.options().dtype(at::kLong));
  const float* pp = p.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> cum(V);
    for (int64_t r = lo; r < hi; ++r) {
      const float* pr = pp + r * V;
      if (rp != nullptr && rp[r]) {
        const float* qr = qp + r * V;
        auto res = [&](int64_t i) { const float d = pr[i] - qr[i]; return d > 0.0f ? d : 0.0f; };
        if (running_sums(res, V, cum.data()) > 0.0) {  // else p <= q everywhere (rounding): draw from p
          op[r] = inverse_cdf(cum.data(), V, up[r]);
          continue;
        }
      }
      running_sums([&](int64_t i) { return pr[i]; }, V, cum.data());
      op[r] = inverse_cdf(cum.data(), V, up[r]);
    }
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> verify_window(const torch::Tensor& probs, const torch::Tensor& q,
                                                       const torch::Tensor& drafts, const torch::Tensor& coins,
                                                       const torch::Tensor& valid, const torch::Tensor& noise,
                                                       const c10::optional<torch::Tensor>& extra) {
  TORCH_CHECK(probs.dim() == 3 && q.dim() == 3, "probs [B, L+1, V], q [B, L, V]");
  const int64_t B = q.size(0), L = q.size(1), V = q.size(2);
  TORCH_CHECK(L >= 1 && probs.size(0) == B && probs.size(1) == L + 1 && probs.size(2) == V, "probs: [B, L+1, V]");
  for (const auto* t : {&probs, &q, &coins, &noise})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "probs, q, coins, noise: contiguous fp32");
  TORCH_CHECK(drafts.scalar_type() == at::kLong && drafts.is_contiguous() && drafts.numel() == B * L, "drafts");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.numel() == B * L, "valid");
  TORCH_CHECK(coins.numel() == B * L && noise.numel() == B * V, "coins [B, L], noise [B, V]");
  const float* ep = nullptr;
  if (extra.has_value()) {
    TORCH_CHECK(extra->scalar_type() == at::kFloat && extra->is_contiguous() && extra->numel() == B * L, "extra");
    ep = extra->data_ptr<float>();
  }
  auto r_out = torch::empty({B}, drafts.options());
  auto x_out = torch::empty({B}, drafts.options());
  const float *pp = probs.data_ptr<float>(), *qp = q.data_ptr<float>(), *cp = coins.data_ptr<float>();
  const float* np = noise.data_ptr<float>();
  const int64_t* dp = drafts.data_ptr<int64_t>();
  const bool* vp = valid.data_ptr<bool>();
  int64_t *ro = r_out.data_ptr<int64_t>(), *xo = x_out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int64_t r = 0;  // drafts accepted before the first rejection: u q(d) < p(d) + extra
      for (; r < L; ++r) {
        const int64_t j = b * L + r, d = dp[j];
        const float* pj = pp + (b * (L + 1) + r) * V;
        const float target = ep != nullptr ? pj[d] + ep[j] : pj[d];
        if (!(vp[j] && cp[j] * qp[j * V + d] < target)) break;
      }
      const float* pr = pp + (b * (L + 1) + r) * V;
      const float* nb = np + b * V;
      float mass = 0.0f;
      const float* qr = qp + (b * L + (r < L ? r : L - 1)) * V;
      if (r < L) {
        double m = 0.0;
        for (int64_t i = 0; i < V; ++i) {
          const float d = pr[i] - qr[i];
          m += d > 0.0f ? d : 0.0f;
        }
        mass = static_cast<float>(m);
      }
      // argmax(dist / noise), dist = norm(max(p_r - q_r, 0)) (p_r if that has no mass, or for the bonus)
      const bool res = r < L && mass > 0.0f;
      float best = -std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t i = 0; i < V; ++i) {
        float dist = pr[i];
        if (res) {
          const float d = pr[i] - qr[i];
          dist = (d > 0.0f ? d : 0.0f) / mass;
        }
        const float v = dist / nb[i];
        if (v > best) {
          best = v;
          arg = i;
        }
      }
      ro[b] = r;
      xo[b] = arg;
    }
  });
  return {r_out, x_out};
}

}  // namespace vargen_cpu
