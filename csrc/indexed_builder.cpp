// Megatron MMap indexed-dataset builder and its Python bindings (see indexed_builder.h;
// the file helpers and the streaming merger are in indexed_io.cpp).
//
// The files written here are byte-identical to those of Megatron-Core's
// `IndexedDatasetBuilder` for the same documents: .bin is the raw concatenation
// of the sequences in the builder's dtype; .idx is the header, int32 lengths,
// int64 byte pointers, int64 document indices and (multimodal only) int8 modes.
// Everything is written under a temporary name and renamed at finalize, .idx
// last, so an interrupted run never leaves a shard that looks complete.
#include "indexed_builder.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "jam_cpp.h"

namespace py = pybind11;

namespace megatron_jam {
namespace indexed {

// ---------------------------------------------------------------- tokens

namespace {

// Calls f(typed pointer) for the element type of a native, C-contiguous array.
template <typename F>
void visit_input(const py::array& a, F&& f) {
  const void* p = a.data();
  const char kind = a.dtype().kind();
  const auto size = a.itemsize();
  if (kind == 'b' || (kind == 'u' && size == 1)) return f(static_cast<const uint8_t*>(p));
  if (kind == 'u' && size == 2) return f(static_cast<const uint16_t*>(p));
  if (kind == 'u' && size == 4) return f(static_cast<const uint32_t*>(p));
  if (kind == 'u' && size == 8) return f(static_cast<const uint64_t*>(p));
  if (kind == 'i' && size == 1) return f(static_cast<const int8_t*>(p));
  if (kind == 'i' && size == 2) return f(static_cast<const int16_t*>(p));
  if (kind == 'i' && size == 4) return f(static_cast<const int32_t*>(p));
  if (kind == 'i' && size == 8) return f(static_cast<const int64_t*>(p));
  if (kind == 'f' && size == 4) return f(static_cast<const float*>(p));
  if (kind == 'f' && size == 8) return f(static_cast<const double*>(p));
  throw py::type_error("tokens must be a numeric array, got dtype " +
                       py::str(a.dtype()).cast<std::string>());
}

template <typename F>
void visit_output(int code, F&& f) {
  switch (code) {
    case 1: return f(uint8_t{});
    case 2: return f(int8_t{});
    case 3: return f(int16_t{});
    case 4: return f(int32_t{});
    case 5: return f(int64_t{});
    case 6: return f(double{});
    case 7: return f(float{});
    case 8: return f(uint16_t{});
  }
  throw std::invalid_argument("unknown Megatron dtype code " + std::to_string(code));
}

// Whether value v fits dtype Out exactly (floats must be integral for integer Out).
template <typename Out, typename In>
inline bool fits(In v) {
  if constexpr (!std::is_integral_v<Out>) {
    return true;
  } else if constexpr (std::is_floating_point_v<In>) {
    return std::isfinite(v) && v == std::floor(v) &&
           v >= static_cast<double>(std::numeric_limits<Out>::min()) &&
           v <= static_cast<double>(std::numeric_limits<Out>::max());
  } else if constexpr (std::is_signed_v<In>) {
    if (v < 0) return std::is_signed_v<Out> && static_cast<int64_t>(v) >= int64_t(std::numeric_limits<Out>::min());
    return static_cast<uint64_t>(v) <= uint64_t(std::numeric_limits<Out>::max());
  } else {
    return static_cast<uint64_t>(v) <= uint64_t(std::numeric_limits<Out>::max());
  }
}

template <typename Out, typename In>
int64_t first_out_of_range(const In* p, size_t n) {
  if constexpr (std::is_same_v<In, Out>) return -1;
  bool ok = true;
  for (size_t i = 0; i < n; ++i) ok &= fits<Out>(p[i]);  // branch-free, vectorisable
  if (ok) return -1;
  for (size_t i = 0; i < n; ++i)
    if (!fits<Out>(p[i])) return static_cast<int64_t>(i);
  return -1;
}

template <typename Out, typename In>
void write_converted(File& out, const In* p, size_t n, std::vector<char>& scratch) {
  if constexpr (std::is_same_v<In, Out>) {
    out.write(p, n * sizeof(Out));
  } else {
    scratch.resize(kConvertChunk * sizeof(Out));
    Out* buf = reinterpret_cast<Out*>(scratch.data());
    for (size_t start = 0; start < n; start += kConvertChunk) {
      const size_t m = std::min(kConvertChunk, n - start);
      for (size_t i = 0; i < m; ++i) buf[i] = static_cast<Out>(p[start + i]);
      out.write(buf, m * sizeof(Out));
    }
  }
}

// Releases the GIL for long conversions/writes only: for small documents the
// release/acquire pair costs more than the work.
class ReleaseGilIfLarge {
 public:
  explicit ReleaseGilIfLarge(py::ssize_t n) : state_(n >= (1 << 15) ? PyEval_SaveThread() : nullptr) {}
  ~ReleaseGilIfLarge() {
    if (state_) PyEval_RestoreThread(state_);
  }
  ReleaseGilIfLarge(const ReleaseGilIfLarge&) = delete;
  ReleaseGilIfLarge& operator=(const ReleaseGilIfLarge&) = delete;

 private:
  PyThreadState* state_;
};

constexpr int kNotSwapped = 0x0200, kAligned = 0x0100;  // NPY_ARRAY_NOTSWAPPED, NPY_ARRAY_ALIGNED

py::array as_tokens(const py::object& obj) {
  auto a = py::array::ensure(obj, py::array::c_style | kAligned | kNotSwapped);
  if (!a) throw py::type_error("tokens must be array-like (numpy array, torch tensor or list)");
  return a;
}

std::vector<int64_t> as_int_vector(const py::object& obj, const char* what) {
  if (PyList_CheckExact(obj.ptr()) || PyTuple_CheckExact(obj.ptr())) {  // fast path: small Python lists
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    std::vector<int64_t> out;
    out.reserve(seq.size());
    for (py::handle h : seq) {
      const long long v = PyLong_AsLongLong(h.ptr());
      if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        break;  // not plain ints (e.g. numpy scalars or floats): take the numpy path
      }
      out.push_back(v);
    }
    if (out.size() == static_cast<size_t>(seq.size())) return out;
  }
  using Arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  Arr a = Arr::ensure(obj);
  if (!a) throw py::type_error(std::string(what) + " must be a sequence of integers");
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

}  // namespace

// ---------------------------------------------------------------- builder

namespace {

class Builder {
 public:
  Builder(std::string bin_path, int dtype, bool multimodal, bool durable)
      : bin_path_(std::move(bin_path)), dtype_(dtype), multimodal_(multimodal), durable_(durable) {
    dtype_size(dtype);  // validates the code
    bin_tmp_ = temporary_path(bin_path_);
    bin_ = File(bin_tmp_, "wb");
  }
  ~Builder() { abort(); }

  void add_item(const py::object& tokens, int64_t mode) {
    check_open();
    auto a = as_tokens(tokens);
    check_length(a.size(), "item");
    check_mode(mode, 0);
    check_tokens(a, "item");
    write_tokens(a);
    lengths_.push_back(static_cast<int32_t>(a.size()));
    if (multimodal_) modes_.push_back(static_cast<int8_t>(mode));
  }

  void add_document(const py::object& tokens, const py::object& lengths, const py::object& modes) {
    add_documents(tokens, lengths, py::none(), modes);
  }

  // Many documents at once: sequence_lengths per sequence, document_lengths
  // = sequences per document (None: one document), modes per sequence.
  void add_documents(const py::object& tokens, const py::object& sequence_lengths,
                     const py::object& document_lengths, const py::object& modes) {
    check_open();
    auto a = as_tokens(tokens);
    const auto lens = as_int_vector(sequence_lengths, "lengths");
    std::vector<int64_t> docs = document_lengths.is_none()
                                    ? std::vector<int64_t>{static_cast<int64_t>(lens.size())}
                                    : as_int_vector(document_lengths, "document_lengths");
    std::vector<int64_t> mode_values;
    if (!modes.is_none()) mode_values = as_int_vector(modes, "modes");
    validate_batch(a, lens, docs, modes.is_none() ? nullptr : &mode_values);
    check_tokens(a, "document");
    write_tokens(a);
    for (int64_t l : lens) lengths_.push_back(static_cast<int32_t>(l));
    for (int64_t d : docs) docs_.push_back(docs_.back() + d);
    if (multimodal_) {
      if (modes.is_none()) modes_.resize(modes_.size() + lens.size(), 0);
      for (int64_t m : mode_values) modes_.push_back(static_cast<int8_t>(m));
    }
  }

  void end_document() {
    check_open();
    docs_.push_back(static_cast<int64_t>(lengths_.size()));
  }

  void add_index(const std::string& prefix) {
    check_open();
    const IdxHeader h = read_idx_header(prefix + ".idx");
    if (h.dtype != dtype_)
      throw std::invalid_argument(h.path + ": dtype " + dtype_name(h.dtype) + " != builder dtype " +
                                  dtype_name(dtype_));
    if (multimodal_ && !h.has_modes && h.sequence_count > 0)
      throw std::invalid_argument(h.path + ": builder is multimodal but the index has no modes");
    File in(h.path, "rb");
    std::vector<int32_t> lens(h.sequence_count);
    std::vector<int64_t> docs(h.document_count);
    std::vector<int8_t> modes(multimodal_ ? h.sequence_count : 0);
    in.read_at(h.lengths_offset(), lens.data(), lens.size() * 4);
    in.read_at(h.documents_offset(), docs.data(), docs.size() * 8);
    if (multimodal_) in.read_at(h.modes_offset(), modes.data(), modes.size());
    validate_shard(h, lens, docs, prefix + ".bin");
    const auto offset = static_cast<int64_t>(lengths_.size());
    lengths_.insert(lengths_.end(), lens.begin(), lens.end());
    for (size_t i = 1; i < docs.size(); ++i) docs_.push_back(offset + docs[i]);
    modes_.insert(modes_.end(), modes.begin(), modes.end());
    guard_io([&] {
      File bin(prefix + ".bin", "rb");
      copy_buffer_.resize(kIoBuffer);
      stream_section(bin, 0, file_size(prefix + ".bin"), copy_buffer_,
                     [&](const char* p, size_t m, uint64_t) { bin_.write(p, m); });
    });
  }

  void finalize(const std::string& idx_path) {
    check_open();
    const std::string idx_tmp = temporary_path(idx_path);
    TempGuard guard({idx_tmp});
    guard_io([&] {
      if (durable_) bin_.sync();
      bin_.close();
      File idx(idx_tmp, "wb");
      write_idx(idx, dtype_, lengths_, docs_, multimodal_ ? &modes_ : nullptr);
      if (durable_) idx.sync();
      idx.close();
      publish(bin_tmp_, bin_path_, idx_tmp, idx_path, durable_);
    });
    guard.release();
    state_ = State::kFinalized;
  }

  // Discards everything written so far (no-op after finalize).
  void abort() {
    if (state_ == State::kFinalized || state_ == State::kAborted) return;
    try {
      bin_.close();
    } catch (...) {
    }
    std::remove(bin_tmp_.c_str());
    state_ = State::kAborted;
  }

  py::array_t<int32_t> sequence_lengths() const { return to_numpy(lengths_); }
  py::array_t<int64_t> document_indices() const { return to_numpy(docs_); }
  py::object sequence_modes() const { return multimodal_ ? py::object(to_numpy(modes_)) : py::none(); }
  uint64_t token_count() const { return tokens_; }
  int dtype() const { return dtype_; }
  bool multimodal() const { return multimodal_; }
  std::string state() const {
    static const char* names[] = {"open", "finalized", "aborted", "failed"};
    return names[static_cast<int>(state_)];
  }

 private:
  enum class State { kOpen, kFinalized, kAborted, kFailed };

  template <typename T>
  static py::array_t<T> to_numpy(const std::vector<T>& v) {
    py::array_t<T> out(v.size());
    if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
    return out;
  }

  void check_open() const {
    if (state_ != State::kOpen)
      throw std::runtime_error("builder for " + bin_path_ + " is " + state() + "; no more writes");
  }

  static void check_length(int64_t n, const char* what) {
    if (n < 0 || n > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument(std::string(what) + " length " + std::to_string(n) +
                                  " does not fit int32 (Megatron sequence_lengths)");
  }

  static void check_mode(int64_t mode, size_t index) {
    if (mode < -128 || mode > 127)
      throw std::invalid_argument("mode " + std::to_string(mode) + " of sequence " + std::to_string(index) +
                                  " does not fit int8");
  }

  void validate_batch(const py::array& a, const std::vector<int64_t>& lens, const std::vector<int64_t>& docs,
                      const std::vector<int64_t>* modes) const {
    int64_t total = 0, sequences = 0;
    for (size_t i = 0; i < lens.size(); ++i) {
      check_length(lens[i], ("sequence " + std::to_string(i)).c_str());
      total += lens[i];
    }
    if (total != static_cast<int64_t>(a.size()))
      throw std::invalid_argument("sequence lengths sum to " + std::to_string(total) + " but " +
                                  std::to_string(a.size()) + " tokens were given");
    for (int64_t d : docs) {
      if (d < 0) throw std::invalid_argument("negative document length " + std::to_string(d));
      sequences += d;
    }
    if (sequences != static_cast<int64_t>(lens.size()))
      throw std::invalid_argument("document lengths sum to " + std::to_string(sequences) + " sequences but " +
                                  std::to_string(lens.size()) + " sequence lengths were given");
    if (modes && modes->size() != lens.size())
      throw std::invalid_argument(std::to_string(modes->size()) + " modes for " + std::to_string(lens.size()) +
                                  " sequences");
    if (modes)
      for (size_t i = 0; i < modes->size(); ++i) check_mode((*modes)[i], i);
  }

  void validate_shard(const IdxHeader& h, const std::vector<int32_t>& lens, const std::vector<int64_t>& docs,
                      const std::string& bin_path) const {
    uint64_t tokens = 0;
    for (int32_t l : lens) {
      if (l < 0) throw std::invalid_argument(h.path + ": negative sequence length");
      tokens += static_cast<uint64_t>(l);
    }
    for (size_t i = 0; i < docs.size(); ++i)
      if ((i == 0 && docs[i] != 0) || (i > 0 && docs[i] < docs[i - 1]))
        throw std::invalid_argument(h.path + ": invalid document index at position " + std::to_string(i));
    if (docs.back() != static_cast<int64_t>(lens.size()))
      throw std::invalid_argument(h.path + ": last document index != sequence count");
    if (file_size(bin_path) != tokens * dtype_size(dtype_))
      throw std::invalid_argument(bin_path + ": size does not match its index");
  }

  void check_tokens(const py::array& a, const char* what) const {
    int64_t bad = -1;
    std::string value, range;
    visit_output(dtype_, [&](auto out_tag) {
      using Out = decltype(out_tag);
      visit_input(a, [&](const auto* p) {
        {
          ReleaseGilIfLarge release(a.size());
          bad = first_out_of_range<Out>(p, static_cast<size_t>(a.size()));
        }
        if (bad >= 0) value = std::to_string(p[bad]);
      });
      if constexpr (std::is_integral_v<Out>)
        range = " [" + std::to_string(+std::numeric_limits<Out>::min()) + ", " +
                std::to_string(+std::numeric_limits<Out>::max()) + "]";
    });
    if (bad >= 0)
      throw std::invalid_argument("token id " + value + " at position " + std::to_string(bad) + " of the " +
                                  what + " is not an integer in the range of dtype " + dtype_name(dtype_) +
                                  range + "; nothing was written for this call");
  }

  void write_tokens(const py::array& a) {
    guard_io([&] {
      visit_output(dtype_, [&](auto out_tag) {
        using Out = decltype(out_tag);
        visit_input(a, [&](const auto* p) {
          ReleaseGilIfLarge release(a.size());
          write_converted<Out>(bin_, p, static_cast<size_t>(a.size()), scratch_);
        });
      });
    });
    tokens_ += static_cast<uint64_t>(a.size());
  }

  // Runs an I/O step; on failure the builder is unusable (its .bin is partial).
  template <typename F>
  void guard_io(F&& f) {
    try {
      f();
    } catch (...) {
      state_ = State::kFailed;
      throw;
    }
  }

  std::string bin_path_, bin_tmp_;
  int dtype_;
  bool multimodal_, durable_;
  File bin_;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> docs_{0};
  std::vector<int8_t> modes_;
  std::vector<char> scratch_, copy_buffer_;
  uint64_t tokens_ = 0;
  State state_ = State::kOpen;
};

}  // namespace
}  // namespace indexed

void register_indexed_builder(py::module_& m) {
  using namespace indexed;
  auto sub = m.def_submodule("indexed", "Megatron MMap indexed-dataset builder (C++)");
  py::register_exception<IoError>(sub, "IndexedIOError", PyExc_OSError);
  py::class_<Builder>(sub, "Builder")
      .def(py::init<std::string, int, bool, bool>(), py::arg("bin_path"), py::arg("dtype_code"),
           py::arg("multimodal") = false, py::arg("durable") = false)
      .def("add_item", &Builder::add_item, py::arg("tokens"), py::arg("mode") = 0)
      .def("add_document", &Builder::add_document, py::arg("tokens"), py::arg("lengths"),
           py::arg("modes") = py::none())
      .def("add_documents", &Builder::add_documents, py::arg("tokens"), py::arg("sequence_lengths"),
           py::arg("document_lengths"), py::arg("modes") = py::none())
      .def("end_document", &Builder::end_document)
      .def("add_index", &Builder::add_index, py::arg("path_prefix"))
      .def("finalize", &Builder::finalize, py::arg("idx_path"))
      .def("abort", &Builder::abort)
      .def_property_readonly("sequence_lengths", &Builder::sequence_lengths)
      .def_property_readonly("document_indices", &Builder::document_indices)
      .def_property_readonly("sequence_modes", &Builder::sequence_modes)
      .def_property_readonly("token_count", &Builder::token_count)
      .def_property_readonly("dtype_code", &Builder::dtype)
      .def_property_readonly("multimodal", &Builder::multimodal)
      .def_property_readonly("state", &Builder::state);
  sub.def(
      "merge",
      [](const std::vector<std::string>& prefixes, const std::string& output_prefix, int multimodal,
         size_t chunk_elements, bool durable) {
        MergeStats s;
        {
          py::gil_scoped_release release;
          s = merge(prefixes, output_prefix, multimodal, chunk_elements, durable);
        }
        py::dict d;
        d["sequences"] = s.sequences;
        d["documents"] = s.documents;
        d["tokens"] = s.tokens;
        d["multimodal"] = s.multimodal;
        return d;
      },
      py::arg("prefixes"), py::arg("output_prefix"), py::arg("multimodal") = -1,
      py::arg("chunk_elements") = 1 << 18, py::arg("durable") = false);
  sub.def(
      "read_idx_header",
      [](const std::string& idx_path) {
        const IdxHeader h = read_idx_header(idx_path);
        py::dict d;
        d["dtype_code"] = h.dtype;
        d["sequence_count"] = h.sequence_count;
        d["document_count"] = h.document_count;
        d["has_modes"] = h.has_modes;
        return d;
      },
      py::arg("idx_path"));
}

}  // namespace megatron_jam
