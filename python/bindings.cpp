// pybind11 binding of csrc/ as the module safecode_kernels._C.
//
// The extension does not link against libtorch: Python passes buffer-protocol views of CPU
// tensors (numpy arrays; fp16/bf16 as 2-byte views), so it builds in seconds and survives
// torch upgrades. Everything the kernel relies on (shapes, strides, dtypes, writability) is
// checked here, so no call from Python can make it read or write out of bounds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "step_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw py::value_error(what);
}

py::buffer_info view(const py::buffer& b, const char* name, bool writable) {
  py::buffer_info info = b.request(writable);
  require(!writable || !info.readonly, std::string(name) + " must be writable");
  return info;
}

// A 1-D contiguous buffer of `n` items of `itemsize` bytes.
void* vector_ptr(const py::buffer& b, const char* name, int64_t n, py::ssize_t itemsize, bool writable) {
  py::buffer_info info = view(b, name, writable);
  require(info.ndim == 1, std::string(name) + " must be 1-D");
  require(info.itemsize == itemsize, std::string(name) + " has the wrong item size");
  require(info.shape[0] == n,
          std::string(name) + " has length " + std::to_string(info.shape[0]) + ", expected " + std::to_string(n));
  require(n <= 1 || info.strides[0] == itemsize, std::string(name) + " must be contiguous");
  return info.ptr;
}

struct Matrix {
  void* ptr;
  int64_t rows, cols, row_stride;
};

// A 2-D buffer with unit stride along the vocabulary.
Matrix matrix(const py::buffer& b, const char* name, py::ssize_t itemsize, bool writable) {
  py::buffer_info info = view(b, name, writable);
  require(info.ndim == 2, std::string(name) + " must be 2-D [batch, vocab]");
  require(info.itemsize == itemsize, std::string(name) + " has item size " + std::to_string(info.itemsize) +
                                         ", expected " + std::to_string(itemsize));
  require(info.shape[1] <= 1 || info.strides[1] == itemsize, std::string(name) + " must have unit vocabulary stride");
  require(info.strides[0] % itemsize == 0 && info.strides[0] >= 0,
          std::string(name) + " has an unsupported row stride");
  return Matrix{info.ptr, info.shape[0], info.shape[1], info.strides[0] / itemsize};
}

// The names Python passes for the logits' dtype (ops/step_cpu.py), exported as _C.DTYPES.
const std::pair<const char*, safecode::DType> kDTypes[] = {
    {"float32", safecode::DType::kFloat32},
    {"float16", safecode::DType::kFloat16},
    {"bfloat16", safecode::DType::kBFloat16},
};

safecode::DType parse_dtype(const std::string& name) {
  for (const auto& [known, dtype] : kDTypes)
    if (name == known) return dtype;
  throw py::type_error("unsupported dtype " + name + ": expected float32, float16 or bfloat16");
}

// The codes of step_cpu.h by the names of safecode_kernels/ops/codes.py, so that a test can
// check that both sides agree (tests/ops/test_codes.py).
py::dict row_status_codes() {
  py::dict d;
  d["OK"] = static_cast<int>(safecode::kRowOk);
  d["REAL_NOT_FINITE"] = static_cast<int>(safecode::kRealNotFinite);
  d["NOISED_NOT_FINITE"] = static_cast<int>(safecode::kNoisedNotFinite);
  d["ALL_BANNED_CONTRAST"] = static_cast<int>(safecode::kAllBannedContrast);
  d["OVERFLOW_CONTRAST"] = static_cast<int>(safecode::kOverflowContrast);
  d["ALL_BANNED_BIAS"] = static_cast<int>(safecode::kAllBannedBias);
  d["OVERFLOW_BIAS"] = static_cast<int>(safecode::kOverflowBias);
  return d;
}

py::dict verdict_codes() {
  py::dict d;
  d["UNSAFE"] = static_cast<int>(safecode::kVerdictUnsafe);
  d["SAFE"] = static_cast<int>(safecode::kVerdictSafe);
  d["NONE"] = static_cast<int>(safecode::kVerdictNone);
  return d;
}

py::dict dtype_codes() {
  py::dict d;
  for (const auto& [name, dtype] : kDTypes) d[name] = static_cast<int>(dtype);
  return d;
}

// Returns the number of rows whose status is not kRowOk (0: nothing to check in Python).
int64_t step(const py::buffer& real, const py::buffer& noised, const std::string& dtype, const py::buffer& verdict,
             const py::buffer& refusal_ids, const py::buffer& tokens, const py::buffer& status,
             const safecode::StepParams& params, std::optional<py::buffer> logits,
             std::optional<py::buffer> mass_before, std::optional<py::buffer> mass_after, int num_threads) {
  safecode::StepBuffers b;
  b.dtype = parse_dtype(dtype);
  const py::ssize_t itemsize = b.dtype == safecode::DType::kFloat32 ? 4 : 2;
  const Matrix r = matrix(real, "logits_real", itemsize, false);
  const Matrix n = matrix(noised, "logits_noised", itemsize, false);
  require(r.rows == n.rows && r.cols == n.cols, "logits_real and logits_noised differ in shape");
  b.real = r.ptr;
  b.noised = n.ptr;
  b.batch = r.rows;
  b.vocab = r.cols;
  b.real_row_stride = r.row_stride;
  b.noised_row_stride = n.row_stride;
  b.verdict = static_cast<const int8_t*>(vector_ptr(verdict, "verdict", b.batch, 1, false));
  py::buffer_info ids = view(refusal_ids, "refusal_ids", false);
  require(ids.ndim == 1 && ids.itemsize == 8 && (ids.shape[0] <= 1 || ids.strides[0] == 8),
          "refusal_ids must be a contiguous 1-D int64 buffer");
  b.refusal_ids = static_cast<const int64_t*>(ids.ptr);
  b.num_refusal = ids.shape[0];
  b.tokens = static_cast<int64_t*>(vector_ptr(tokens, "tokens", b.batch, 8, true));
  b.status = static_cast<int32_t*>(vector_ptr(status, "status", b.batch, 4, true));
  if (logits) {
    const Matrix out = matrix(*logits, "logits", 4, true);
    require(out.rows == b.batch && out.cols == b.vocab && (b.batch == 1 || out.row_stride == b.vocab),
            "logits must be a contiguous float32 [batch, vocab] buffer");
    b.logits = static_cast<float*>(out.ptr);
  }
  require(mass_before.has_value() == mass_after.has_value(), "give both mass_before and mass_after, or neither");
  if (mass_before) {
    b.mass_before = static_cast<float*>(vector_ptr(*mass_before, "mass_before", b.batch, 4, true));
    b.mass_after = static_cast<float*>(vector_ptr(*mass_after, "mass_after", b.batch, 4, true));
  }
  b.num_threads = num_threads;
  py::gil_scoped_release release;  // the kernel touches no Python object
  safecode::safecode_step_cpu(params, b);
  int64_t problems = 0;
  for (int64_t row = 0; row < b.batch; ++row) problems += b.status[row] != safecode::kRowOk;
  return problems;
}

// The same step on raw addresses, for the launcher's fast path (ops/step_cpu.py): no buffer
// protocol, so a call costs about a microsecond. The caller vouches for the layout (CPU
// tensors it holds during the call: [batch, vocab] logits with unit vocabulary stride and
// the given row strides, int8 verdicts [batch], contiguous int64 ids, outputs of the right
// size); the kernel still checks every value (verdicts, ids, parameters) and each row's data.
// Returns None when every row is OK, else the list of row status codes.
py::object step_addresses(uintptr_t real, uintptr_t noised, int dtype, int64_t batch, int64_t vocab,
                          int64_t real_row_stride, int64_t noised_row_stride, uintptr_t verdict, uintptr_t refusal_ids,
                          int64_t num_refusal, uintptr_t tokens, const safecode::StepParams& params, uint64_t seed,
                          uintptr_t logits, uintptr_t mass_before, uintptr_t mass_after, int num_threads) {
  require(dtype >= 0 && dtype <= 2, "unknown dtype code " + std::to_string(dtype));
  require(real && noised && verdict && tokens && (num_refusal == 0 || refusal_ids), "a required address is null");
  require((mass_before == 0) == (mass_after == 0), "give both mass_before and mass_after, or neither");
  safecode::StepBuffers b;
  b.dtype = static_cast<safecode::DType>(dtype);
  b.real = reinterpret_cast<const void*>(real);
  b.noised = reinterpret_cast<const void*>(noised);
  b.batch = batch;
  b.vocab = vocab;
  b.real_row_stride = real_row_stride;
  b.noised_row_stride = noised_row_stride;
  b.verdict = reinterpret_cast<const int8_t*>(verdict);
  b.refusal_ids = reinterpret_cast<const int64_t*>(refusal_ids);
  b.num_refusal = num_refusal;
  b.tokens = reinterpret_cast<int64_t*>(tokens);
  b.logits = reinterpret_cast<float*>(logits);
  b.mass_before = reinterpret_cast<float*>(mass_before);
  b.mass_after = reinterpret_cast<float*>(mass_after);
  b.num_threads = num_threads;
  int32_t small[16];
  std::vector<int32_t> large;
  if (batch > 16) large.resize(static_cast<size_t>(std::max<int64_t>(batch, 0)));
  b.status = batch > 16 ? large.data() : small;
  safecode::StepParams p = params;
  p.seed = seed;
  bool ok = true;
  {
    py::gil_scoped_release release;  // the kernel touches no Python object
    safecode::safecode_step_cpu(p, b);
    for (int64_t row = 0; row < b.batch; ++row) ok &= b.status[row] == safecode::kRowOk;
  }
  if (ok) return py::none();
  py::list status;
  for (int64_t row = 0; row < b.batch; ++row) status.append(b.status[row]);
  return status;
}

int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ CPU kernels of safecode_kernels (see csrc/)";

  py::class_<safecode::StepParams>(m, "StepParams")
      .def(py::init<>())
      .def_readwrite("real_weight", &safecode::StepParams::real_weight)
      .def_readwrite("alpha_unsafe", &safecode::StepParams::alpha_unsafe)
      .def_readwrite("alpha_safe", &safecode::StepParams::alpha_safe)
      .def_readwrite("log_plausibility", &safecode::StepParams::log_plausibility)
      .def_readwrite("sensitive_top_k", &safecode::StepParams::sensitive_top_k)
      .def_readwrite("scope_all", &safecode::StepParams::scope_all)
      .def_readwrite("bias_unsafe", &safecode::StepParams::bias_unsafe)
      .def_readwrite("bias_safe", &safecode::StepParams::bias_safe)
      .def_readwrite("temperature", &safecode::StepParams::temperature)
      .def_readwrite("top_k", &safecode::StepParams::top_k)
      .def_readwrite("top_p", &safecode::StepParams::top_p)
      .def_readwrite("seed", &safecode::StepParams::seed);

  m.def("step", &step, py::arg("real"), py::arg("noised"), py::arg("dtype"), py::arg("verdict"), py::arg("refusal_ids"),
        py::arg("tokens"), py::arg("status"), py::arg("params"), py::arg("logits") = py::none(),
        py::arg("mass_before") = py::none(), py::arg("mass_after") = py::none(), py::arg("num_threads") = 0,
        "One fused SafeCoDe step over a batch; writes tokens, status and the optional outputs, and returns "
        "the number of rows whose status is not OK.");

  m.def("step_addresses", &step_addresses, py::arg("real"), py::arg("noised"), py::arg("dtype"), py::arg("batch"),
        py::arg("vocab"), py::arg("real_row_stride"), py::arg("noised_row_stride"), py::arg("verdict"),
        py::arg("refusal_ids"), py::arg("num_refusal"), py::arg("tokens"), py::arg("params"), py::arg("seed"),
        py::arg("logits"), py::arg("mass_before"), py::arg("mass_after"), py::arg("num_threads"),
        "The step on data addresses of tensors the caller holds (its layout checked by the caller); returns None "
        "when every row is OK, else the row status codes.");

  m.attr("ROW_STATUS") = row_status_codes();
  m.attr("VERDICT") = verdict_codes();
  m.attr("DTYPES") = dtype_codes();

  m.def("openmp_threads", &openmp_threads, "OpenMP's default thread count, or 0 when built without OpenMP.");
}
