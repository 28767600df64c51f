// A bounded selection of the k best (value, index) candidates. "Best" is the total order
// of docs/design.md §2.2: larger value first, and the lower index first among equal values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace safecode {

struct Candidate {
  float value;
  int64_t index;
};

// True when a comes before b in the order (a is the better candidate).
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Candidates above a threshold are appended to a buffer, and the buffer is cut back to the
// k best (std::nth_element, linear time) whenever it holds 2k: amortised O(1) per candidate
// with no branchy heap updates. The threshold is the worst kept value after the last cut, so
// it only lags behind the exact k-th value (letting a few more candidates in), never leads.
class TopK {
 public:
  explicit TopK(int64_t k = 0) : k_(k) { buffer_.reserve(static_cast<size_t>(std::min<int64_t>(2 * k + 16, 4096))); }

  int64_t k() const { return k_; }

  // Whether a candidate of this value could still enter (indices only grow while scanning).
  bool admits(float value) const { return k_ > 0 && (!has_threshold_ || value > threshold_); }

  void offer(float value, int64_t index) {
    // NaN never enters (its row is reported as bad anyway): the cut needs a strict weak order.
    if (!admits(value) || value != value) return;
    buffer_.push_back(Candidate{value, index});
    if (static_cast<int64_t>(buffer_.size()) >= 2 * k_ + 16) cut();
  }

  // Offers z[0, n) as indices base, base + 1, ...: larger than every index offered so far,
  // so a value equal to the threshold never enters and one compare per token suffices.
  void offer_block(const float* z, int64_t n, int64_t base) {
    if (k_ == 0) return;
    int64_t i = 0;
    // Groups of 32 with a vectorised maximum first: after the first blocks almost no token
    // beats the threshold, so most groups cost a few vector max instructions.
    for (; i + 32 <= n; i += 32) {
      if (has_threshold_) {
        float max = z[i];
#pragma omp simd reduction(max : max)
        for (int64_t j = 0; j < 32; ++j) max = max > z[i + j] ? max : z[i + j];
        if (!(max > threshold_)) continue;
      }
      for (int64_t j = i; j < i + 32; ++j) offer(z[j], base + j);
    }
    for (; i < n; ++i) offer(z[i], base + i);
  }

  // Offers another selection's candidates (any indices: the cut orders ties by index).
  void merge(const TopK& other) {
    for (const Candidate& c : other.buffer_) {
      buffer_.push_back(c);
      if (static_cast<int64_t>(buffer_.size()) >= 2 * k_ + 16) cut();
    }
    if (!other.buffer_.empty()) cut();
  }

  // Cuts the buffer to exactly the k best; needed before contains() and items().
  void finalize() { cut(); }

  // Whether (value, index) belongs to the kept set, assuming it was offered (after finalize()).
  bool contains(float value, int64_t index) const {
    if (k_ == 0) return false;
    if (static_cast<int64_t>(buffer_.size()) < k_) return true;  // nothing was ever dropped
    return !ranks_before(buffer_[static_cast<size_t>(k_ - 1)], Candidate{value, index});
  }

  // The kept candidates, at most k, in no particular order except that the worst is last
  // when there are k of them (after finalize()).
  const std::vector<Candidate>& items() const { return buffer_; }

 private:
  void cut() {
    if (static_cast<int64_t>(buffer_.size()) < k_) return;
    // The k best first, with the k-th (the worst kept) at position k - 1.
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.end(), ranks_before);
    buffer_.resize(static_cast<size_t>(k_));
    threshold_ = buffer_.back().value;
    has_threshold_ = true;
  }

  int64_t k_;
  std::vector<Candidate> buffer_;
  float threshold_ = 0.0f;
  bool has_threshold_ = false;  // k candidates were seen: below threshold_ none can enter
};

}  // namespace safecode
