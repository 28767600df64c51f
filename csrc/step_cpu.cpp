// The fused SafeCoDe step op on the CPU. See step_cpu.h for the contract and docs/design.md §2 for
// the math. Structure:
//   1. scan: one streaming pass over both input rows, block by block. Each block's
//      contrast goes through a vectorised loop (with the row statistics reduced in
//      registers); the scalar bookkeeping (argmax index, bounded top-k selections) only
//      touches a block when its maximum can change them, which after the first blocks
//      is rare. Rows are split into vocabulary chunks when the batch is too small to
//      occupy every thread, and the chunks' partial results merged.
//   2. finish: the refusal set is small, so its tokens are handled exactly from their ids:
//      statistics of non-refusal tokens are collected in the scan, and the refusal
//      tokens' values before and after the bias are folded in at the end. Greedy decoding
//      and the statistics therefore need no second pass; sampling makes one pass over the
//      row's modulated logits (kept in cache-resident scratch or the logits output).
#include "step_cpu.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__) || defined(__APPLE__)
#include <stdlib.h>  // getloadavg
#include <unistd.h>  // sysconf
#endif

#include "contrast_block.h"
#include "fast_exp.h"
#include "float_convert.h"
#include "philox.h"
#include "top_k.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SAFECODE_NO_CLONES)
// Compile the vectorised loops for AVX2 as well as the baseline, chosen at load time,
// so that a portable build still uses wide vectors where the CPU has them.
#define SAFECODE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SAFECODE_CLONES
#endif

namespace safecode {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 512;       // tokens per vectorised block (fits L1 as fp32)
constexpr int64_t kMinChunk = 16384;  // smallest vocabulary chunk worth a thread
// Fewer tokens per thread and one thread is as fast (measured on a 2-core AMD EPYC Zen 3:
// one row of up to 524288 tokens gains nothing from a second thread, 16 rows of 32000 gain
// 1.5-1.9x; a second thread that waits for a busy core costs up to milliseconds).
constexpr int64_t kMinTokensPerThread = 262144;
constexpr size_t kKeepScratchBytes = 64u << 20;  // scratch kept between calls up to this size

// Row-constant inputs: the contrast and the refusal bias of the row's verdict.
struct RowSetup {
  Contrast contrast;
  float bias;
};

// What the scan of one vocabulary chunk of one row leaves for the finish step. "Plain"
// tokens are those outside the refusal set.
struct Partial {
  uint32_t bad = 0;
  float max_all = -kInf;
  float plain_max = -kInf;  // best plain token (value, lowest index)
  int64_t plain_arg = -1;
  float plain_shift = -kInf;  // plain_sum = sum over plain tokens of exp(z - plain_shift)
  double plain_sum = 0.0;
  TopK sensitive;  // top sensitive_top_k of z over all tokens
  TopK sampling;   // top top_k of z over plain tokens (sampling with top-k)

  void merge(const Partial& o) {
    bad |= o.bad;
    max_all = std::max(max_all, o.max_all);
    if (o.plain_max > plain_max ||
        (o.plain_max == plain_max && o.plain_arg >= 0 && (plain_arg < 0 || o.plain_arg < plain_arg))) {
      plain_max = o.plain_max;
      plain_arg = o.plain_arg;
    }
    if (o.plain_shift > plain_shift) {
      plain_sum = plain_sum * std::exp(static_cast<double>(plain_shift) - o.plain_shift) + o.plain_sum;
      plain_shift = o.plain_shift;
    } else if (o.plain_shift > -kInf) {
      plain_sum += o.plain_sum * std::exp(static_cast<double>(o.plain_shift) - plain_shift);
    }
    sensitive.merge(o.sensitive);
    sampling.merge(o.sampling);
  }
};

// ---------------------------------------------------------------------------------------
// Small vectorisable loops over a block of contrasted logits (the contrast itself is in
// contrast_block.h).

SAFECODE_CLONES float block_max(const float* z, int64_t n) {
  float max = -kInf;
#pragma omp simd reduction(max : max)
  for (int64_t i = 0; i < n; ++i) max = max > z[i] ? max : z[i];
  return max;
}

// Sum of exp(z - shift).
SAFECODE_CLONES float exp_sum(const float* z, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += exp_nonpositive(z[i] - shift);
  return sum;
}

// exp of a token's logit over the temperature, shifted by the row maximum first as the torch
// reference does: (z - shift) / T in float32 is 0 at the maximum and <= 0 elsewhere for every
// finite shift and T > 0. Dividing (not multiplying by 1/T) keeps a temperature whose inverse
// overflows exact: the maximum still gets exp(0) = 1 (0 * inf would be NaN), so such a
// temperature behaves as greedy, as torch's does.
inline float scaled_exp(float z, float shift, float temperature) { return exp_nonpositive((z - shift) / temperature); }

SAFECODE_CLONES float scaled_exp_sum(const float* z, int64_t n, float shift, float temperature) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += scaled_exp(z[i], shift, temperature);
  return sum;
}

// ---------------------------------------------------------------------------------------
// Scan: one pass over a chunk [begin, end) of one row. `refusal` points at the first
// refusal id >= begin (ids are sorted), `refusal_end` past the last id.

template <typename T>
void scan_chunk(const T* real, const T* noised, const int64_t* refusal, const int64_t* refusal_end, int64_t begin,
                int64_t end, const Contrast& contrast, bool want_sum, float* z_row, Partial& part) {
  alignas(64) float local[kBlock];
  float saved[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min(kBlock, end - b0);
    float* z = z_row ? z_row + b0 : local;
    const BlockStats st = contrast_block(real + b0, noised + b0, n, contrast, z);
    part.bad |= st.bad;
    part.max_all = std::max(part.max_all, st.max);
    if (part.sensitive.admits(st.max)) part.sensitive.offer_block(z, n, b0);

    // The plain view of the block: its few refusal tokens set to -inf for a moment.
    int64_t num_refusal = 0;
    while (refusal + num_refusal < refusal_end && refusal[num_refusal] < b0 + n) {
      const int64_t i = refusal[num_refusal] - b0;
      saved[num_refusal++] = z[i];
      z[i] = -kInf;
    }
    const float plain_max = num_refusal ? block_max(z, n) : st.max;
    if (plain_max > part.plain_max) {  // strict: an earlier block keeps ties (lower index)
      part.plain_max = plain_max;
      part.plain_arg = b0 + (std::find(z, z + n, plain_max) - z);
    }
    if (part.sampling.admits(plain_max)) part.sampling.offer_block(z, n, b0);
    if (want_sum && plain_max > -kInf && plain_max <= FLT_MAX) {
      if (plain_max > part.plain_shift) {
        part.plain_sum *= std::exp(static_cast<double>(part.plain_shift) - plain_max);
        part.plain_shift = plain_max;
      }
      part.plain_sum += exp_sum(z, n, part.plain_shift);
    }
    for (int64_t j = 0; j < num_refusal; ++j) z[refusal[j] - b0] = saved[j];
    refusal += num_refusal;
  }
}

// Which problem a row flagged as bad has, in the order of RowStatus (a rare, slow path).
template <typename T>
int32_t classify_bad_row(const T* real, const T* noised, int64_t vocab) {
  for (int64_t v = 0; v < vocab; ++v)
    if (!(load_as_float(real, v) <= FLT_MAX)) return kRealNotFinite;
  for (int64_t v = 0; v < vocab; ++v)
    if (!(load_as_float(noised, v) <= FLT_MAX)) return kNoisedNotFinite;
  return kOverflowContrast;
}

// ---------------------------------------------------------------------------------------
// Finish: refusal tokens, checks, statistics and the token choice for one row.

struct RefusalValue {
  int64_t index;
  float before, after;
};

// Probability mass of the refusal tokens under softmax, from the non-refusal partial sum.
float refusal_mass(const Partial& p, const std::vector<RefusalValue>& refusal, bool after) {
  float shift = p.plain_shift;
  for (const RefusalValue& r : refusal) shift = std::max(shift, after ? r.after : r.before);
  if (!(shift > -kInf)) return 0.0f;
  double mass = 0.0;
  for (const RefusalValue& r : refusal) mass += std::exp(static_cast<double>(after ? r.after : r.before) - shift);
  const double plain = p.plain_shift > -kInf ? p.plain_sum * std::exp(static_cast<double>(p.plain_shift) - shift) : 0.0;
  return static_cast<float>(mass / (mass + plain));
}

struct Weighted {
  float value;
  double weight;
  int64_t index;
};

bool weighted_before(const Weighted& a, const Weighted& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Reorders `items` so that its first n entries are the nucleus: the shortest prefix of the
// order (value desc, index asc) whose weight reaches `limit`. Returns n. Expected linear
// time (a quickselect on weight), so top-p over a whole vocabulary needs no full sort.
int64_t nucleus(std::vector<Weighted>& items, double limit) {
  int64_t lo = 0, hi = static_cast<int64_t>(items.size());
  double before = 0.0;  // weight of items[0, lo), all of which precede items[lo, hi)
  while (hi - lo > 32) {
    Weighted a = items[lo], b = items[lo + (hi - lo) / 2], c = items[hi - 1];
    if (weighted_before(b, a)) std::swap(a, b);
    if (weighted_before(c, b)) std::swap(b, c);
    if (weighted_before(b, a)) std::swap(a, b);
    const Weighted pivot = b;  // median of three
    auto first = items.begin() + lo, last = items.begin() + hi;
    auto split = std::partition(first, last, [&](const Weighted& x) { return weighted_before(x, pivot); });
    auto at = std::find_if(split, last, [&](const Weighted& x) { return x.index == pivot.index; });
    std::iter_swap(split, at);
    const int64_t mid = split - items.begin();
    double upper = 0.0;
    for (int64_t i = lo; i < mid; ++i) upper += items[i].weight;
    if (before + upper >= limit) {
      hi = mid;
    } else if (before + upper + items[mid].weight >= limit) {
      return mid + 1;
    } else {
      before += upper + items[mid].weight;
      lo = mid + 1;
    }
  }
  std::sort(items.begin() + lo, items.begin() + hi, weighted_before);
  for (int64_t i = lo; i < hi; ++i) {
    if (i > 0 && before >= limit) return i;
    before += items[i].weight;
  }
  return hi;
}

// Draws from items[0, n) in proportion to their weights.
int64_t draw(const std::vector<Weighted>& items, int64_t n, double u) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += items[i].weight;
  const double target = u * total;
  double running = 0.0;
  int64_t last_positive = items[0].index;
  for (int64_t i = 0; i < n; ++i) {
    if (items[i].weight <= 0.0) continue;
    running += items[i].weight;
    last_positive = items[i].index;
    if (running > target) return items[i].index;
  }
  return last_positive;  // only reached through rounding at the very end
}

class Sampler {
 public:
  Sampler(const StepParams& p, int64_t vocab) : p_(p), vocab_(vocab) {}

  // z_row holds the modulated logits; shift is their maximum; sampling_top holds the top-k
  // non-refusal candidates when top_k is active.
  int64_t sample(int64_t row, const float* z_row, float shift, const Partial& part,
                 const std::vector<RefusalValue>& refusal) {
    const double u = philox_uniform(p_.seed, static_cast<uint64_t>(row));
    items_.clear();
    if (p_.top_k > 0 && p_.top_k < vocab_) {
      for (const Candidate& c : part.sampling.items()) items_.push_back(weighted(c.value, c.index, shift));
      for (const RefusalValue& r : refusal) items_.push_back(weighted(r.after, r.index, shift));
      const int64_t k = std::min<int64_t>(p_.top_k, items_.size());
      std::partial_sort(items_.begin(), items_.begin() + k, items_.end(), weighted_before);
      items_.resize(k);
      return draw(items_, top_p_cut(), u);
    }
    if (p_.top_p < 1.0f) {
      for (int64_t v = 0; v < vocab_; ++v)
        if (z_row[v] > -kInf) items_.push_back(weighted(z_row[v], v, shift));
      return draw(items_, top_p_cut(), u);
    }
    return draw_full_row(z_row, shift, u);
  }

 private:
  Weighted weighted(float value, int64_t index, float shift) const {
    // The scaled logit rounded to float32 as torch's is (it may overflow to -inf: weight 0).
    const float scaled = (value - shift) / p_.temperature;
    return Weighted{value, std::exp(static_cast<double>(scaled)), index};
  }

  int64_t top_p_cut() {
    if (p_.top_p >= 1.0f) return static_cast<int64_t>(items_.size());
    double total = 0.0;
    for (const Weighted& w : items_) total += w.weight;
    return nucleus(items_, p_.top_p * total);
  }

  // Inverse-CDF sampling over the whole row: block sums, then a scan inside one block.
  int64_t draw_full_row(const float* z_row, float shift, double u) {
    block_sums_.clear();
    double total = 0.0;
    for (int64_t b0 = 0; b0 < vocab_; b0 += kBlock) {
      const double s = scaled_exp_sum(z_row + b0, std::min(kBlock, vocab_ - b0), shift, p_.temperature);
      block_sums_.push_back(s);
      total += s;
    }
    double target = u * total;
    size_t block = 0;
    for (; block + 1 < block_sums_.size(); ++block) {
      if (block_sums_[block] > 0.0 && target < block_sums_[block]) break;
      target -= block_sums_[block];
    }
    // Scan the chosen block; rounding may leave the target past its end, then the last
    // token with weight in it (or before it) is the draw.
    int64_t last_positive = -1;
    const int64_t b0 = static_cast<int64_t>(block) * kBlock, b1 = std::min(vocab_, b0 + kBlock);
    double running = 0.0;
    for (int64_t v = b0; v < b1; ++v) {
      const double e = scaled_exp(z_row[v], shift, p_.temperature);
      if (e <= 0.0) continue;
      running += e;
      last_positive = v;
      if (running > target) return v;
    }
    for (int64_t v = b0 - 1; v >= 0 && last_positive < 0; --v)
      if (z_row[v] > -kInf) last_positive = v;
    return last_positive;
  }

  const StepParams& p_;
  int64_t vocab_;
  std::vector<Weighted> items_;
  std::vector<double> block_sums_;
};

template <typename T>
struct Rows {
  const T* real(const StepBuffers& b, int64_t row) const {
    return static_cast<const T*>(b.real) + row * b.real_row_stride;
  }
  const T* noised(const StepBuffers& b, int64_t row) const {
    return static_cast<const T*>(b.noised) + row * b.noised_row_stride;
  }
};

RowSetup row_setup(const StepParams& p, const StepBuffers& b, int64_t row, float real_max) {
  const int8_t v = b.verdict[row];
  RowSetup s;
  s.contrast.w = p.real_weight;
  s.contrast.alpha = v == kVerdictSafe ? p.alpha_safe : p.alpha_unsafe;
  s.contrast.cutoff = p.log_plausibility > -kInf ? p.log_plausibility + real_max : -kInf;
  s.bias = v == kVerdictUnsafe ? p.bias_unsafe : (v == kVerdictSafe ? p.bias_safe : 0.0f);
  return s;
}

template <typename T>
float row_max(const T* x, int64_t n) {
  float m = -kInf;
  for (int64_t i = 0; i < n; ++i) {
    const float v = load_as_float(x, i);
    m = m > v ? m : v;
  }
  return m;
}

template <typename T>
void finish_row(const StepParams& p, const StepBuffers& b, int64_t row, const RowSetup& s, Partial& part, float* z_row,
                Sampler* sampler, std::vector<RefusalValue>& refusal) {
  int32_t& status = b.status[row];
  status = kRowOk;
  const Rows<T> rows;
  if (part.bad) {
    status = classify_bad_row(rows.real(b, row), rows.noised(b, row), b.vocab);
    return;
  }
  if (part.max_all == -kInf) {
    status = kAllBannedContrast;
    return;
  }

  // The refusal tokens, exactly: their value before and after the bias.
  const bool bias_all = p.scope_all || p.sensitive_top_k >= b.vocab;
  refusal.clear();
  bool overflow = false;
  for (int64_t j = 0; j < b.num_refusal; ++j) {
    const int64_t v = b.refusal_ids[j];
    const float before =
        z_row ? z_row[v] : s.contrast(load_as_float(rows.real(b, row), v), load_as_float(rows.noised(b, row), v));
    const bool target = bias_all || part.sensitive.contains(before, v);
    const float after = target ? before + s.bias : before;
    overflow |= !(after <= FLT_MAX);
    if (z_row) z_row[v] = after;
    refusal.push_back(RefusalValue{v, before, after});
  }
  float best = part.plain_max;
  int64_t best_index = part.plain_arg;
  for (const RefusalValue& r : refusal) {
    if (r.after > best || (r.after == best && best_index >= 0 && r.index < best_index) ||
        (best_index < 0 && r.after > -kInf)) {
      best = r.after;
      best_index = r.index;
    }
  }
  if (overflow) {
    status = kOverflowBias;
    return;
  }
  if (!(best > -kInf)) {
    status = kAllBannedBias;
    return;
  }

  if (b.mass_before) {
    b.mass_before[row] = refusal_mass(part, refusal, false);
    b.mass_after[row] = refusal_mass(part, refusal, true);
  }
  b.tokens[row] = sampler ? sampler->sample(row, z_row, best, part, refusal) : best_index;
}

size_t checked_elements(int64_t batch, int64_t vocab) {
  return static_cast<size_t>(batch) * static_cast<size_t>(vocab);
}

// How many threads the machine can run now without descheduling another: one (this one)
// plus the cores the one-minute load average leaves idle. A busy machine thus degrades to
// one thread instead of waiting at a barrier for a thread that got no core. Reading the
// load costs a few microseconds, against the hundreds of a step that could use threads.
int idle_cores_plus_this_one() {
#if defined(__linux__) || defined(__APPLE__)
  double load = 0.0;
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (cores > 0 && getloadavg(&load, 1) == 1) {
    // The load counts this thread (it is running) and whatever else runs or waits.
    const double idle = static_cast<double>(cores) - std::max(load, 1.0);
    return 1 + static_cast<int>(std::max(0.0, idle + 0.5));
  }
#endif
  return std::numeric_limits<int>::max();
}

// Scratch for the modulated logits when sampling without a logits output: reused across
// calls of the same thread so that sampling does not page-fault a fresh buffer every step.
float* sampling_scratch(size_t elements, std::unique_ptr<float[]>& owned) {
  thread_local std::unique_ptr<float[]> kept;
  thread_local size_t kept_size = 0;
  if (elements * sizeof(float) > kKeepScratchBytes) {
    owned.reset(new float[elements]);
    return owned.get();
  }
  if (kept_size < elements) {
    kept.reset(new float[elements]);
    kept_size = elements;
  }
  return kept.get();
}

template <typename T>
void run(const StepParams& p, const StepBuffers& b) {
  const int64_t batch = b.batch, vocab = b.vocab;
  const Rows<T> rows;
  // A temperature whose inverse overflows float32 leaves every token but the maximum with
  // probability 0: greedy, ties to the lower index, as every backend decides (decodes_greedily).
  const bool sampling = p.temperature > 0.0f && std::isfinite(1.0f / p.temperature);
  std::unique_ptr<float[]> owned;
  float* z_all = b.logits ? b.logits : (sampling ? sampling_scratch(checked_elements(batch, vocab), owned) : nullptr);

#ifdef _OPENMP
  const int max_threads = b.num_threads > 0 ? b.num_threads : omp_get_max_threads();
#else
  const int max_threads = 1;
#endif
  // A thread only pays for waking it when it gets enough tokens, and only when a core is
  // free to run it: the parallel region ends with a barrier that waits for every thread.
  int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, batch * vocab / kMinTokensPerThread)));
  if (threads > 1) threads = std::min(threads, idle_cores_plus_this_one());
  // Split rows into vocabulary chunks only when the batch alone cannot occupy the threads.
  // Up to 4 tasks per thread, so that the dynamic schedule below can balance them.
  int64_t chunks = 1;
  if (threads > 1 && batch < 4 * threads) {
    chunks = std::min<int64_t>((4 * threads + batch - 1) / batch, std::max<int64_t>(1, vocab / kMinChunk));
  }
  const int64_t chunk_len = ((vocab + chunks - 1) / chunks + kBlock - 1) / kBlock * kBlock;
  chunks = (vocab + chunk_len - 1) / chunk_len;
  const int64_t tasks = batch * chunks;

  const int64_t sensitive_k = p.scope_all ? 0 : std::min(p.sensitive_top_k, vocab);
  const int64_t sensitive_heap = sensitive_k >= vocab ? 0 : sensitive_k;  // k >= V: every token
  const int64_t sampling_heap = sampling && p.top_k > 0 && p.top_k < vocab ? p.top_k : 0;
  const bool want_sum = b.mass_before != nullptr;

  std::vector<Partial> parts(static_cast<size_t>(tasks));
  std::vector<float> real_max(static_cast<size_t>(batch), 0.0f);
  const bool plausibility = p.log_plausibility > -kInf;

  auto scan_task = [&](int64_t t) {
    const int64_t row = t / chunks, begin = (t % chunks) * chunk_len;
    const int64_t end = std::min(vocab, begin + chunk_len);
    Partial& part = parts[t];
    part.sensitive = TopK(sensitive_heap);
    part.sampling = TopK(sampling_heap);
    const RowSetup s = row_setup(p, b, row, real_max[row]);
    float* z_row = z_all ? z_all + row * vocab : nullptr;
    const int64_t* ids_end = b.refusal_ids + b.num_refusal;
    const int64_t* first_id = std::lower_bound(b.refusal_ids, ids_end, begin);
    scan_chunk(rows.real(b, row), rows.noised(b, row), first_id, ids_end, begin, end, s.contrast, want_sum, z_row,
               part);
  };
  auto finish_task = [&](int64_t row) {
    Partial& part = parts[row * chunks];
    for (int64_t c = 1; c < chunks; ++c) part.merge(parts[row * chunks + c]);
    part.sensitive.finalize();
    part.sampling.finalize();
    const RowSetup s = row_setup(p, b, row, real_max[row]);
    std::vector<RefusalValue> refusal;
    std::unique_ptr<Sampler> sampler(sampling ? new Sampler(p, vocab) : nullptr);
    finish_row<T>(p, b, row, s, part, z_all ? z_all + row * vocab : nullptr, sampler.get(), refusal);
  };

  if (threads == 1) {
    // The common decoding step: no parallel region at all (nothing to wake or wait for).
    if (plausibility)
      for (int64_t row = 0; row < batch; ++row) real_max[row] = row_max(rows.real(b, row), vocab);
    for (int64_t t = 0; t < tasks; ++t) scan_task(t);
    for (int64_t row = 0; row < batch; ++row) finish_task(row);
    return;
  }

  // An exception may not leave an OpenMP region (it would terminate the process): record
  // it and throw after the region instead.
  int failed = 0;
  // Dynamic schedules: a thread that starts late (its core busy with other work) takes
  // fewer tasks instead of holding the others back with a share fixed up front.
#pragma omp parallel num_threads(threads)
  {
    if (plausibility) {
      // The cutoff needs each row's maximum before any token can be judged.
#pragma omp for schedule(dynamic, 1)
      for (int64_t row = 0; row < batch; ++row) real_max[row] = row_max(rows.real(b, row), vocab);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      try {
        scan_task(t);
      } catch (...) {
#pragma omp atomic write
        failed = 1;
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < batch; ++row) {
      try {
        finish_task(row);
      } catch (...) {
#pragma omp atomic write
        failed = 1;
      }
    }
  }
  if (failed) throw std::runtime_error("safecode_step_cpu: out of memory");
}

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void validate(const StepParams& p, const StepBuffers& b) {
  check(b.real && b.noised && b.verdict && b.tokens && b.status, "safecode_step_cpu: a required buffer is null");
  check(b.batch > 0, "batch must be > 0");
  check(b.vocab > 0, "vocab must be > 0 (the vocabulary is empty)");
  // Inputs are only read, so rows may overlap (an expanded tensor has row stride 0).
  check(b.real_row_stride >= 0 && b.noised_row_stride >= 0, "row strides must be >= 0");
  check((b.mass_before == nullptr) == (b.mass_after == nullptr),
        "mass_before and mass_after must both be given or both be null");
  check(b.num_refusal >= 0 && (b.num_refusal == 0 || b.refusal_ids), "refusal ids missing");
  // The messages are built only on failure (building them costs more than the loops).
  for (int64_t j = 0; j < b.num_refusal; ++j) {
    const int64_t v = b.refusal_ids[j];
    if (!(v >= 0 && v < b.vocab))
      check(false,
            "refusal id " + std::to_string(v) + " is outside the vocabulary [0, " + std::to_string(b.vocab) + ")");
    check(j == 0 || v > b.refusal_ids[j - 1], "refusal ids must be sorted and unique");
  }
  for (int64_t row = 0; row < b.batch; ++row) {
    const int8_t v = b.verdict[row];
    if (!(v == kVerdictUnsafe || v == kVerdictNone || v == kVerdictSafe))
      check(false, "unknown verdict value " + std::to_string(v) + " in row " + std::to_string(row) +
                       ": expected +1 (unsafe), -1 (safe) or 0 (none)");
  }
  check(std::isfinite(p.real_weight) && p.real_weight > 0.0f, "real_weight must be finite and > 0");
  check(std::isfinite(p.alpha_unsafe) && p.alpha_unsafe >= 0.0f, "alpha must be finite and >= 0");
  check(std::isfinite(p.alpha_safe) && p.alpha_safe >= 0.0f, "alpha_safe must be finite and >= 0");
  check(!std::isnan(p.log_plausibility) && p.log_plausibility <= 0.0f,
        "log_plausibility must be <= 0 (beta in (0, 1])");
  check(p.sensitive_top_k >= 0, "sensitive_top_k must be >= 0");
  check(!std::isnan(p.bias_unsafe) && p.bias_unsafe < kInf, "the unsafe bias must be a number below +inf");
  check(!std::isnan(p.bias_safe) && p.bias_safe < kInf, "the safe bias must be a number below +inf");
  check(std::isfinite(p.temperature) && p.temperature >= 0.0f, "temperature must be finite and >= 0");
  check(p.top_k >= 0, "top_k must be >= 0");
  check(p.top_p > 0.0f && p.top_p <= 1.0f, "top_p must be in (0, 1]");
}

}  // namespace

void safecode_step_cpu(const StepParams& params, const StepBuffers& buffers) {
  validate(params, buffers);
  switch (buffers.dtype) {
    case DType::kFloat32: return run<float>(params, buffers);
    case DType::kFloat16: return run<Half>(params, buffers);
    case DType::kBFloat16: return run<BFloat16>(params, buffers);
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(buffers.dtype)));
}

}  // namespace safecode
