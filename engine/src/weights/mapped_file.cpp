// SPDX-License-Identifier: LGPL-2.1-or-later
#include "mapped_file.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <algorithm>
#include <map>
#include <optional>
#include <mutex>
#include <sstream>

#include "weights/weights.h"

namespace liveavatar::weights {

WeightsError::WeightsError(const std::string& file, const std::string& message)
    : Error(file.empty() ? message : file + ": " + message), file_(file) {}

namespace detail {
namespace {
// Live file mappings by start address (for file_range): address -> (size, path).
std::mutex g_mappings_mutex;
std::map<uintptr_t, std::pair<uint64_t, std::string>>& mappings() {
  static std::map<uintptr_t, std::pair<uint64_t, std::string>> m;
  return m;
}
}  // namespace

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path, bool populate) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw WeightsError(path, std::string("cannot open: ") + std::strerror(errno) +
                                 ". Check the path and that the file was downloaded completely");
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw WeightsError(path, "not a regular file. Point to the checkpoint file itself");
  }
  if (st.st_size == 0) {
    ::close(fd);
    throw WeightsError(path, "empty file (0 bytes): the download is incomplete. Download it again");
  }
  void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping keeps its own reference to the file
  if (p == MAP_FAILED) {
    throw WeightsError(path, std::string("cannot map the file: ") + std::strerror(err));
  }
  if (populate) {
    // Not MAP_POPULATE: on a writable private mapping it prefaults for writing, i.e. copies every page.
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
    if (::madvise(p, static_cast<size_t>(st.st_size), MADV_POPULATE_READ) != 0) {
      ::madvise(p, static_cast<size_t>(st.st_size), MADV_WILLNEED);  // kernels before 5.14
    }
  }
  std::shared_ptr<MappedFile> f(new MappedFile());
  f->data_ = static_cast<uint8_t*>(p);
  f->size_ = static_cast<uint64_t>(st.st_size);
  f->mapped_ = true;
  f->path_ = path;
  {
    std::lock_guard<std::mutex> lock(g_mappings_mutex);
    mappings()[reinterpret_cast<uintptr_t>(f->data_)] = {f->size_, path};
  }
  return f;
}

std::shared_ptr<MappedFile> MappedFile::from_memory(const void* data, size_t size, const std::string& name) {
  std::shared_ptr<MappedFile> f(new MappedFile());
  // 64-byte alignment for the copies' tensors: over-allocate and start at an aligned address.
  f->owned_.resize(size + 64);
  auto addr = reinterpret_cast<uintptr_t>(f->owned_.data());
  f->data_ = f->owned_.data() + ((64 - addr % 64) % 64);
  if (size != 0) std::memcpy(f->data_, data, size);
  f->size_ = size;
  f->path_ = name;
  return f;
}

MappedFile::~MappedFile() {
  if (mapped_) {
    {
      std::lock_guard<std::mutex> lock(g_mappings_mutex);
      mappings().erase(reinterpret_cast<uintptr_t>(data_));
    }
    ::munmap(data_, static_cast<size_t>(size_));
  }
}

at::Tensor tensor_from_mapping(const std::shared_ptr<MappedFile>& file, uint64_t offset,
                               const std::vector<int64_t>& shape, at::ScalarType dtype, bool* copied) {
  auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  uint8_t* ptr = const_cast<uint8_t*>(file->data()) + offset;
  size_t item = c10::elementSize(dtype);
  if (reinterpret_cast<uintptr_t>(ptr) % item == 0) {
    std::shared_ptr<MappedFile> keep = file;  // the deleter owns a reference: the mapping outlives the tensor
    return at::from_blob(ptr, shape, [keep](void*) mutable { keep.reset(); }, options);
  }
  at::Tensor t = at::empty(shape, options);
  if (file->mapped())
    read_file_range({file->path(), offset, static_cast<uint64_t>(t.nbytes())}, t.data_ptr());  // no SIGBUS window
  else
    std::memcpy(t.data_ptr(), ptr, t.nbytes());
  if (copied) *copied = true;
  return t;
}

std::optional<FileRange> mapped_range(const void* data, uint64_t nbytes) {
  const auto addr = reinterpret_cast<uintptr_t>(data);
  std::lock_guard<std::mutex> lock(g_mappings_mutex);
  auto it = mappings().upper_bound(addr);
  if (it == mappings().begin()) return std::nullopt;
  --it;
  const uint64_t offset = addr - it->first;
  if (offset + nbytes > it->second.first) return std::nullopt;
  return FileRange{it->second.second, offset, nbytes};
}

}  // namespace detail

std::optional<FileRange> file_range(const at::Tensor& view) {
  if (!view.defined() || !view.device().is_cpu() || !view.is_contiguous() || view.nbytes() == 0) return std::nullopt;
  return detail::mapped_range(view.data_ptr(), view.nbytes());
}

at::Tensor read_owned(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.has_storage() || t.numel() == 0) return t;
  const auto& storage = t.storage();
  const auto whole = detail::mapped_range(storage.data(), storage.nbytes());
  if (!whole) return t;
  // The elements the view spans: [storage_offset, storage_offset + extent), strides from the readers are >= 0.
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) < 0) throw WeightsError(whole->path, "a tensor with a negative stride cannot be read");
    extent += (t.size(d) - 1) * t.stride(d);
  }
  const uint64_t item = t.element_size();
  const FileRange range{whole->path, whole->offset + static_cast<uint64_t>(t.storage_offset()) * item,
                        static_cast<uint64_t>(extent) * item};
  if (range.offset + range.size > whole->offset + whole->size)
    throw WeightsError(whole->path, "a tensor reaches past its storage");
  at::Tensor flat = at::empty({extent}, t.options());
  read_file_range(range, flat.data_ptr());
  return t.is_contiguous() ? flat.view(t.sizes()) : flat.as_strided(t.sizes(), t.strides());
}

void read_file_range(const FileRange& range, void* dst) {
  const int fd = ::open(range.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw WeightsError(range.path, std::string("cannot open: ") + std::strerror(errno));
  auto* out = static_cast<uint8_t*>(dst);
  uint64_t done = 0;
  while (done < range.size) {
    const ssize_t r = ::pread(fd, out + done, static_cast<size_t>(std::min<uint64_t>(range.size - done, 1u << 30)),
                              static_cast<off_t>(range.offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const int err = errno;
      ::close(fd);
      throw WeightsError(range.path, "read failed at byte " + std::to_string(range.offset + done) + ": " +
                                         (r == 0 ? std::string("end of file (the file shrank)") : std::strerror(err)));
    }
    done += static_cast<uint64_t>(r);
  }
  ::close(fd);
}

void release_pages(const at::Tensor& tensor) {
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
  if (!tensor.defined() || !tensor.device().is_cpu() || tensor.nbytes() == 0) return;
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t first = begin / page * page;
  const uintptr_t last = (begin + tensor.nbytes() + page - 1) / page * page;
  // Page-out keeps the contents (anonymous pages go to swap, or stay without one; clean file pages are dropped
  // and read again on the next touch), so a page shared with a neighbouring tensor is safe to include.
  (void)::madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT);
}

namespace detail {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

std::string dtype_string(at::ScalarType type) {
  auto n = safetensors_dtype_name(type);
  return n ? *n : std::string(c10::toString(type));
}

}  // namespace detail
}  // namespace liveavatar::weights
