// Megatron MMap indexed-dataset writer (.bin/.idx), see docs/data.md.
//
// Why C++: Megatron-Core's Python IndexedDatasetBuilder keeps every sequence
// length in Python lists and merges shards element by element, which costs
// hundreds of GB of RAM for thousands of shards. Here the metadata lives in
// std::vectors (13 bytes per sequence), tokens are converted and range-checked
// without Python per-token work, and merging streams fixed-size chunks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace megatron_jam {
namespace indexed {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr size_t kIoBuffer = 1 << 20;      // stdio write buffer and .bin copy chunk (bytes)
constexpr size_t kConvertChunk = 1 << 16;  // elements converted per write

// I/O failures; surface as Python OSError (translator in indexed_builder.cpp).
struct IoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// strerror(errno) as a string.
std::string errno_text();
// Size of a file in bytes; throws IoError naming the path.
uint64_t file_size(const std::string& path);

// Megatron-Core's DType codes (megatron.core.datasets.indexed_dataset.DType).
enum class DType : uint8_t {
  kUInt8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat64 = 6,
  kFloat32 = 7,
  kUInt16 = 8,
};

// Size in bytes of one element of dtype `code`; throws on an unknown code.
size_t dtype_size(int code);
// Name of the dtype ("uint16", ...) for error messages.
const char* dtype_name(int code);

// The fixed-size header of an .idx file plus what its size implies.
struct IdxHeader {
  std::string path;
  int dtype = 0;
  uint64_t sequence_count = 0;
  uint64_t document_count = 0;  // number of documents + 1
  bool has_modes = false;       // deduced from the file size
  static constexpr uint64_t kSize = 34;
  uint64_t lengths_offset() const { return kSize; }
  uint64_t pointers_offset() const { return kSize + 4 * sequence_count; }
  uint64_t documents_offset() const { return kSize + 12 * sequence_count; }
  uint64_t modes_offset() const { return documents_offset() + 8 * document_count; }
};

// Reads and validates the header of `idx_path` (magic, version, dtype, size).
IdxHeader read_idx_header(const std::string& idx_path);

// An owned C stdio stream that names its path in every error.
class File {
 public:
  File() = default;
  File(const std::string& path, const char* mode);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;

  void write(const void* data, size_t bytes);
  void read_at(uint64_t offset, void* data, size_t bytes);
  void close();  // flushes and closes; throws on a write-back error
  void sync();   // flush + fsync
  bool is_open() const { return f_ != nullptr; }
  const std::string& path() const { return path_; }
  std::FILE* get() { return f_; }

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
  std::unique_ptr<char[]> buffer_;
};

// A temporary file path unique to this process, renamed over `path` on commit.
std::string temporary_path(const std::string& path);
// Atomically publishes finished .bin then .idx temporaries: the old .idx is
// removed first so a visible .idx always describes the visible .bin.
void publish(const std::string& bin_tmp, const std::string& bin_path,
             const std::string& idx_tmp, const std::string& idx_path, bool durable);

// Removes temporaries on scope exit unless released (exception safety).
class TempGuard {
 public:
  explicit TempGuard(std::vector<std::string> paths) : paths_(std::move(paths)) {}
  ~TempGuard() {
    for (const auto& p : paths_) std::remove(p.c_str());
  }
  TempGuard(const TempGuard&) = delete;
  TempGuard& operator=(const TempGuard&) = delete;
  void release() { paths_.clear(); }

 private:
  std::vector<std::string> paths_;
};

// Reads `count` elements of T starting at byte `offset` of `in`, buf.size() at
// a time, calling fn(pointer, n, index_of_first) for each chunk.
template <typename T, typename F>
void stream_section(File& in, uint64_t offset, uint64_t count, std::vector<T>& buf, F&& fn) {
  for (uint64_t done = 0; done < count;) {
    const size_t m = static_cast<size_t>(std::min<uint64_t>(buf.size(), count - done));
    in.read_at(offset + done * sizeof(T), buf.data(), m * sizeof(T));
    fn(buf.data(), m, done);
    done += m;
  }
}

// Writes int64 byte pointers for `n` lengths, continuing from `*pointer`.
void write_pointers(File& out, const int32_t* lengths, size_t n, int64_t itemsize, int64_t* pointer,
                    std::vector<int64_t>& scratch);

// Writes a complete .idx (header and all sections) from in-memory metadata.
void write_idx(File& out, int dtype, const std::vector<int32_t>& lengths,
               const std::vector<int64_t>& document_indices,
               const std::vector<int8_t>* modes);

// Streams several datasets into one (.bin and .idx) in constant memory.
// multimodal: 1 = modes required, 0 = modes dropped, -1 = deduce from shards.
// Returns {sequence_count, document_count (without the leading 0), tokens}.
struct MergeStats {
  uint64_t sequences = 0;
  uint64_t documents = 0;
  uint64_t tokens = 0;
  bool multimodal = false;
};
MergeStats merge(const std::vector<std::string>& prefixes, const std::string& output_prefix,
                 int multimodal, size_t chunk_elements, bool durable);

}  // namespace indexed
}  // namespace megatron_jam
