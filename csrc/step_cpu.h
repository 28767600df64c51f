// The fused SafeCoDe step op on the CPU (docs/design.md §2): contrast, plausibility cutoff,
// sensitive top-k set, verdict-conditioned refusal bias and the token choice, with one
// streaming pass over the two input rows. Plain C++: no Python or torch headers.
#pragma once

#include <cmath>
#include <cstdint>

namespace safecode {

// The integers shared with Python are named once on each side: here, and in
// safecode_kernels/ops/codes.py. python/bindings.cpp exports these values (_C.ROW_STATUS,
// _C.VERDICT, _C.DTYPES) and tests/ops/test_codes.py checks that the two sides agree.

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A row's verdict, as int8 in StepBuffers::verdict (codes.Verdict).
enum Verdict : int8_t {
  kVerdictSafe = -1,
  kVerdictNone = 0,
  kVerdictUnsafe = 1,
};

struct StepParams {
  float real_weight = 1.0f;
  float alpha_unsafe = 0.3f;  // also used for the "none" verdict
  float alpha_safe = 0.15f;
  float log_plausibility = -INFINITY;  // log(beta) of the cutoff; -inf disables it
  int64_t sensitive_top_k = 20;
  bool scope_all = false;    // bias every refusal token, not only those in the top-k set
  float bias_unsafe = 1.0f;  // added to refusal logits of unsafe rows
  float bias_safe = -1.0f;   // added to refusal logits of safe rows; may be -inf
  float temperature = 0.0f;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  uint64_t seed = 0;         // sampling stream; the same seed gives the same tokens
};

// Per-row outcome (codes.RowStatus). The first problem found in a row is reported, in this order.
enum RowStatus : int32_t {
  kRowOk = 0,
  kRealNotFinite = 1,      // NaN or +inf in logits_real
  kNoisedNotFinite = 2,    // NaN or +inf in logits_noised
  kAllBannedContrast = 3,  // every token is -inf after the contrast and cutoff
  kOverflowContrast = 4,   // the contrast overflowed float32
  kAllBannedBias = 5,      // every token is -inf after the refusal bias
  kOverflowBias = 6,       // the refusal bias overflowed float32
};

struct StepBuffers {
  const void* real = nullptr;  // [batch, vocab], row stride below, unit vocab stride
  const void* noised = nullptr;
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t vocab = 0;
  int64_t real_row_stride = 0;  // in elements
  int64_t noised_row_stride = 0;
  const int8_t* verdict = nullptr;       // [batch]: Verdict (+1 unsafe, -1 safe, 0 none)
  const int64_t* refusal_ids = nullptr;  // sorted unique, in [0, vocab)
  int64_t num_refusal = 0;
  int64_t* tokens = nullptr;     // out [batch]
  float* logits = nullptr;       // optional out [batch, vocab] (contiguous)
  float* mass_before = nullptr;  // optional out [batch]
  float* mass_after = nullptr;   // optional out [batch]
  int32_t* status = nullptr;     // out [batch], RowStatus
  int num_threads = 0;           // 0: the OpenMP default
};

// Throws std::invalid_argument when the buffers or parameters break the contract above.
// Problems in the data of a row are reported in `status`, never thrown or crashed on.
void safecode_step_cpu(const StepParams& params, const StepBuffers& buffers);

}  // namespace safecode
