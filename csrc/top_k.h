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

class TopK {
 public:
  explicit TopK(int64_t k = 0) : k_(k) { heap_.reserve(static_cast<size_t>(std::min<int64_t>(k, 4096))); }

  int64_t k() const { return k_; }
  bool full() const { return static_cast<int64_t>(heap_.size()) >= k_; }
  // The worst kept candidate (only meaningful when full()).
  const Candidate& worst() const { return heap_.front(); }

  // Whether a candidate of this value could still enter (indices only grow while scanning).
  bool admits(float value) const { return k_ > 0 && (!full() || value > worst().value); }

  void offer(float value, int64_t index) {
    const Candidate c{value, index};
    if (!full()) {
      heap_.push_back(c);
      std::push_heap(heap_.begin(), heap_.end(), ranks_before);
    } else if (k_ > 0 && ranks_before(c, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), ranks_before);
      heap_.back() = c;
      std::push_heap(heap_.begin(), heap_.end(), ranks_before);
    }
  }

  // Offers z[0, n) as indices base, base + 1, ...: larger than every index offered so far,
  // so a value equal to the current worst never enters and one compare per token suffices.
  void offer_block(const float* z, int64_t n, int64_t base) {
    if (k_ == 0) return;
    int64_t i = 0;
    for (; i < n && !full(); ++i) offer(z[i], base + i);
    if (i == n) return;
    float threshold = worst().value;
    // Groups of 16 with a branch-free (vectorisable) test first: after the first blocks
    // almost no token beats the threshold, so most groups cost a few vector compares.
    for (; i + 16 <= n; i += 16) {
      int hits = 0;
#pragma omp simd reduction(+ : hits)
      for (int64_t j = 0; j < 16; ++j) hits += z[i + j] > threshold;
      if (!hits) continue;
      for (int64_t j = i; j < i + 16; ++j) {
        if (z[j] > threshold) {
          offer(z[j], base + j);
          threshold = worst().value;
        }
      }
    }
    for (; i < n; ++i) {
      if (z[i] > threshold) {
        offer(z[i], base + i);
        threshold = worst().value;
      }
    }
  }

  void merge(const TopK& other) {
    for (const Candidate& c : other.heap_) offer(c.value, c.index);
  }

  // Whether (value, index) belongs to the kept set, assuming it was offered.
  bool contains(float value, int64_t index) const {
    if (k_ == 0) return false;
    if (!full()) return true;
    return !ranks_before(worst(), Candidate{value, index});
  }

  const std::vector<Candidate>& items() const { return heap_; }

 private:
  int64_t k_;
  std::vector<Candidate> heap_;  // min-heap under ranks_before: front() is the worst
};

}  // namespace safecode
