// Shared pieces of the indexed-dataset writer: stdio files, .idx header
// parsing, atomic publication, .idx writing and the streaming shard merger.
//
// The merger never holds more than a few chunks of any section: it makes one
// pass per .idx section (lengths, pointers, document indices, modes) over all
// shards, then concatenates the .bin files, so memory does not grow with the
// number or size of shards (Megatron-Core's add_index keeps everything).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "indexed_builder.h"

namespace megatron_jam {
namespace indexed {

std::string errno_text() { return std::strerror(errno); }

uint64_t file_size(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw IoError(path + ": " + errno_text());
  return static_cast<uint64_t>(st.st_size);
}

size_t dtype_size(int code) {
  switch (code) {
    case 1: case 2: return 1;
    case 3: case 8: return 2;
    case 4: case 7: return 4;
    case 5: case 6: return 8;
  }
  throw std::invalid_argument("unknown Megatron dtype code " + std::to_string(code));
}

const char* dtype_name(int code) {
  static const char* names[] = {"?",     "uint8",   "int8",    "int16", "int32",
                                "int64", "float64", "float32", "uint16"};
  return (code >= 1 && code <= 8) ? names[code] : "?";
}

// ---------------------------------------------------------------- File

File::File(const std::string& path, const char* mode) : path_(path) {
  f_ = std::fopen(path.c_str(), mode);
  if (!f_) throw IoError("cannot open " + path + ": " + errno_text());
  if (mode[0] == 'r') {
    std::setvbuf(f_, nullptr, _IONBF, 0);  // reads are whole chunks: straight into the caller's buffer
  } else {
    buffer_.reset(new char[kIoBuffer]);  // uninitialised: no cost per small file
    std::setvbuf(f_, buffer_.get(), _IOFBF, kIoBuffer);
  }
}

File::~File() {
  if (f_) std::fclose(f_);
}

File::File(File&& o) noexcept : f_(o.f_), path_(std::move(o.path_)), buffer_(std::move(o.buffer_)) {
  o.f_ = nullptr;
}

File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    if (f_) std::fclose(f_);
    f_ = o.f_;
    path_ = std::move(o.path_);
    buffer_ = std::move(o.buffer_);
    o.f_ = nullptr;
  }
  return *this;
}

void File::write(const void* data, size_t bytes) {
  if (bytes && std::fwrite(data, 1, bytes, f_) != bytes)
    throw IoError("write to " + path_ + " failed: " + errno_text());
}

void File::read_at(uint64_t offset, void* data, size_t bytes) {
  if (fseeko(f_, static_cast<off_t>(offset), SEEK_SET) != 0)
    throw IoError("seek in " + path_ + " failed: " + errno_text());
  if (bytes && std::fread(data, 1, bytes, f_) != bytes)
    throw IoError("short read from " + path_ + " at byte " + std::to_string(offset));
}

void File::sync() {
  if (std::fflush(f_) != 0 || ::fsync(fileno(f_)) != 0)
    throw IoError("fsync of " + path_ + " failed: " + errno_text());
}

void File::close() {
  if (!f_) return;
  std::FILE* f = f_;
  f_ = nullptr;
  if (std::fclose(f) != 0) throw IoError("closing " + path_ + " failed: " + errno_text());
}

// ---------------------------------------------------------------- header

IdxHeader read_idx_header(const std::string& idx_path) {
  File f(idx_path, "rb");
  char magic[9];
  uint64_t version = 0;
  uint8_t code = 0;
  IdxHeader h;
  h.path = idx_path;
  f.read_at(0, magic, 9);
  if (std::memcmp(magic, kMagic, 9) != 0)
    throw std::invalid_argument(idx_path + ": not a Megatron MMap index (bad magic)");
  f.read_at(9, &version, 8);
  if (version != 1)
    throw std::invalid_argument(idx_path + ": unsupported index version " + std::to_string(version));
  f.read_at(17, &code, 1);
  if (code < 1 || code > 8)
    throw std::invalid_argument(idx_path + ": unknown dtype code " + std::to_string(code));
  h.dtype = code;
  f.read_at(18, &h.sequence_count, 8);
  f.read_at(26, &h.document_count, 8);
  const uint64_t size = file_size(idx_path);
  const uint64_t plain = h.modes_offset();
  if (size == plain) {
    h.has_modes = false;
  } else if (size == plain + h.sequence_count) {
    h.has_modes = true;
  } else {
    throw std::invalid_argument(idx_path + ": size " + std::to_string(size) +
                                " bytes does not match " + std::to_string(h.sequence_count) +
                                " sequences and " + std::to_string(h.document_count) +
                                " document indices (truncated or corrupt)");
  }
  if (h.document_count == 0)
    throw std::invalid_argument(idx_path + ": document index is empty (needs a leading 0)");
  return h;
}

// ---------------------------------------------------------------- publish

std::string temporary_path(const std::string& path) {
  return path + ".tmp-" + std::to_string(::getpid());
}

static void sync_parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  int fd = ::open(dir.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

void publish(const std::string& bin_tmp, const std::string& bin_path, const std::string& idx_tmp,
             const std::string& idx_path, bool durable) {
  if (std::remove(idx_path.c_str()) != 0 && errno != ENOENT)
    throw IoError("cannot remove stale " + idx_path + ": " + errno_text());
  if (std::rename(bin_tmp.c_str(), bin_path.c_str()) != 0)
    throw IoError("cannot rename " + bin_tmp + " to " + bin_path + ": " + errno_text());
  if (std::rename(idx_tmp.c_str(), idx_path.c_str()) != 0)
    throw IoError("cannot rename " + idx_tmp + " to " + idx_path + ": " + errno_text());
  if (durable) sync_parent_dir(idx_path);
}

// Removes temporaries on scope exit unless released (exception safety).
// ---------------------------------------------------------------- idx writing

static void write_idx_header(File& out, int dtype, uint64_t sequences, uint64_t documents) {
  const uint64_t version = 1;
  const uint8_t code = static_cast<uint8_t>(dtype);
  out.write(kMagic, 9);
  out.write(&version, 8);
  out.write(&code, 1);
  out.write(&sequences, 8);
  out.write(&documents, 8);
}

void write_pointers(File& out, const int32_t* lengths, size_t n, int64_t itemsize, int64_t* pointer,
                    std::vector<int64_t>& scratch) {
  for (size_t start = 0; start < n; start += scratch.size()) {
    const size_t m = std::min(scratch.size(), n - start);
    for (size_t i = 0; i < m; ++i) {
      scratch[i] = *pointer;
      *pointer += static_cast<int64_t>(lengths[start + i]) * itemsize;
    }
    out.write(scratch.data(), m * sizeof(int64_t));
  }
}

void write_idx(File& out, int dtype, const std::vector<int32_t>& lengths,
               const std::vector<int64_t>& document_indices, const std::vector<int8_t>* modes) {
  write_idx_header(out, dtype, lengths.size(), document_indices.size());
  out.write(lengths.data(), lengths.size() * sizeof(int32_t));
  std::vector<int64_t> scratch(kConvertChunk);
  int64_t pointer = 0;
  write_pointers(out, lengths.data(), lengths.size(), dtype_size(dtype), &pointer, scratch);
  out.write(document_indices.data(), document_indices.size() * sizeof(int64_t));
  if (modes) out.write(modes->data(), modes->size());
}

// ---------------------------------------------------------------- merge

namespace {

struct Shard {
  IdxHeader header;
  std::string bin_path;
};

std::vector<Shard> open_shards(const std::vector<std::string>& prefixes, int* multimodal) {
  std::vector<Shard> shards;
  bool any_with = false, any_without = false;
  for (const auto& p : prefixes) {
    Shard s{read_idx_header(p + ".idx"), p + ".bin"};
    if (!shards.empty() && s.header.dtype != shards[0].header.dtype)
      throw std::invalid_argument(p + ".idx: dtype " + dtype_name(s.header.dtype) + " differs from " +
                                  dtype_name(shards[0].header.dtype) + " of " + shards[0].header.path);
    if (s.header.sequence_count > 0) (s.header.has_modes ? any_with : any_without) = true;
    shards.push_back(std::move(s));
  }
  if (shards.empty()) throw std::invalid_argument("merge: no input datasets given");
  if (*multimodal < 0) {
    if (any_with && any_without)
      throw std::invalid_argument("merge: some shards have sequence modes and some do not");
    *multimodal = any_with ? 1 : 0;
  }
  if (*multimodal == 1 && any_without)
    for (const auto& s : shards)
      if (!s.header.has_modes && s.header.sequence_count > 0)
        throw std::invalid_argument(s.header.path + ": multimodal merge, but it has no sequence modes");
  return shards;
}

// Lengths section; returns the number of tokens per shard (validated against .bin).
std::vector<uint64_t> merge_lengths(std::vector<Shard>& shards, File& out, std::vector<int32_t>& buf) {
  std::vector<uint64_t> tokens;
  for (auto& s : shards) {
    File in(s.header.path, "rb");
    uint64_t sum = 0;
    stream_section(in, s.header.lengths_offset(), s.header.sequence_count, buf,
                   [&](const int32_t* p, size_t m, uint64_t done) {
                     for (size_t i = 0; i < m; ++i) {
                       if (p[i] < 0)
                         throw std::invalid_argument(s.header.path + ": negative length at sequence " +
                                                     std::to_string(done + i));
                       sum += static_cast<uint64_t>(p[i]);
                     }
                     out.write(p, m * sizeof(int32_t));
                   });
    const uint64_t expected = sum * dtype_size(s.header.dtype);
    const uint64_t actual = file_size(s.bin_path);
    if (actual != expected)
      throw std::invalid_argument(s.bin_path + ": " + std::to_string(actual) + " bytes, index says " +
                                  std::to_string(expected));
    tokens.push_back(sum);
  }
  return tokens;
}

void merge_pointers(std::vector<Shard>& shards, File& out, std::vector<int32_t>& buf) {
  std::vector<int64_t> scratch(buf.size());
  int64_t pointer = 0;
  const int64_t itemsize = static_cast<int64_t>(dtype_size(shards[0].header.dtype));
  for (auto& s : shards) {
    File in(s.header.path, "rb");
    stream_section(in, s.header.lengths_offset(), s.header.sequence_count, buf,
                   [&](const int32_t* p, size_t m, uint64_t) {
                     write_pointers(out, p, m, itemsize, &pointer, scratch);
                   });
  }
}

void merge_documents(std::vector<Shard>& shards, File& out, std::vector<int64_t>& buf) {
  int64_t offset = 0;
  const int64_t zero = 0;
  out.write(&zero, sizeof(zero));
  for (auto& s : shards) {
    File in(s.header.path, "rb");
    const auto n = static_cast<int64_t>(s.header.sequence_count);
    int64_t previous = 0;
    stream_section(in, s.header.documents_offset(), s.header.document_count, buf,
                   [&](int64_t* p, size_t m, uint64_t done) {
                     for (size_t i = 0; i < m; ++i) {
                       const bool first = done + i == 0;
                       if ((first && p[i] != 0) || p[i] < previous || p[i] > n)
                         throw std::invalid_argument(s.header.path + ": invalid document index " +
                                                     std::to_string(p[i]) + " at position " +
                                                     std::to_string(done + i));
                       previous = p[i];
                       p[i] += offset;
                     }
                     const size_t skip = done == 0 ? 1 : 0;
                     out.write(p + skip, (m - skip) * sizeof(int64_t));
                   });
    if (previous != n)
      throw std::invalid_argument(s.header.path + ": last document index " + std::to_string(previous) +
                                  " != sequence count " + std::to_string(n));
    offset += n;
  }
}

void merge_modes(std::vector<Shard>& shards, File& out, std::vector<int8_t>& buf) {
  for (auto& s : shards) {
    if (s.header.sequence_count == 0) continue;
    File in(s.header.path, "rb");
    stream_section(in, s.header.modes_offset(), s.header.sequence_count, buf,
                   [&](const int8_t* p, size_t m, uint64_t) { out.write(p, m); });
  }
}

void copy_bins(std::vector<Shard>& shards, File& out, std::vector<char>& buf) {
  for (auto& s : shards) {
    File in(s.bin_path, "rb");
    const uint64_t size = file_size(s.bin_path);
    stream_section(in, 0, size, buf, [&](const char* p, size_t m, uint64_t) { out.write(p, m); });
  }
}

}  // namespace

MergeStats merge(const std::vector<std::string>& prefixes, const std::string& output_prefix,
                 int multimodal, size_t chunk_elements, bool durable) {
  if (chunk_elements == 0) throw std::invalid_argument("merge: chunk_elements must be positive");
  auto shards = open_shards(prefixes, &multimodal);
  MergeStats stats;
  stats.multimodal = multimodal == 1;
  for (const auto& s : shards) {
    stats.sequences += s.header.sequence_count;
    stats.documents += s.header.document_count - 1;
  }
  const std::string bin_path = output_prefix + ".bin", idx_path = output_prefix + ".idx";
  const std::string bin_tmp = temporary_path(bin_path), idx_tmp = temporary_path(idx_path);
  TempGuard guard({bin_tmp, idx_tmp});
  File idx(idx_tmp, "wb");
  write_idx_header(idx, shards[0].header.dtype, stats.sequences, stats.documents + 1);
  std::vector<int32_t> lengths(chunk_elements);
  std::vector<int64_t> wide(chunk_elements);
  for (uint64_t t : merge_lengths(shards, idx, lengths)) stats.tokens += t;
  merge_pointers(shards, idx, lengths);
  merge_documents(shards, idx, wide);
  if (stats.multimodal) {
    std::vector<int8_t> modes(chunk_elements);
    merge_modes(shards, idx, modes);
  }
  File bin(bin_tmp, "wb");
  std::vector<char> bytes(chunk_elements * 8);
  copy_bins(shards, bin, bytes);
  if (durable) {
    bin.sync();
    idx.sync();
  }
  bin.close();
  idx.close();
  publish(bin_tmp, bin_path, idx_tmp, idx_path, durable);
  guard.release();
  return stats;
}
}  // namespace indexed
}  // namespace megatron_jam
