// A pool for large CPU tensor buffers in front of libtorch's CPU allocator.
//
// libtorch frees every tensor back to malloc, and glibc hands buffers of more
// than a few MiB straight back to the kernel (munmap). A PSMNet pass makes
// hundreds of 5-D activations of 1-200 MiB, so every pass maps them afresh and
// the kernel zeroes each 4 KiB page again on first touch: on two cores about
// a fifth of a pass goes to page faults.
//
// The pool reserves one large range of address space (no memory is committed
// until a page is first written) and carves large buffers out of it: best fit
// among the free blocks, the rest of a block split off, a freed block merged
// with free neighbours, and the range's end extended only when nothing fits.
// Freed memory stays mapped, so later passes touch pages that already exist.
// What the process holds is the extent the pool has grown to, close to the most
// ever in use at once, since passes repeat the same sizes in the same order.
// Small buffers (below kLargeBytes) and anything past the reserved range go to
// the allocator the pool replaced.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <sys/mman.h>

#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <utility>

namespace {

constexpr size_t kLargeBytes = size_t{1} << 20;
// Blocks are whole pages: every buffer starts page-aligned (libtorch wants 64).
constexpr size_t kPage = 4096;
// Address space only; pages are committed when first written.
constexpr size_t kReserveBytes = size_t{1} << 38;  // 256 GiB

struct Figures {
  int64_t in_use = 0;
  int64_t extent = 0;
  int64_t high_water = 0;
  int64_t reused = 0;
  int64_t grown = 0;
};

class LargeBufferPool final : public c10::Allocator {
 public:
  LargeBufferPool(c10::Allocator* small, char* base) : small_(small), base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kLargeBytes) {
      return small_->allocate(n);
    }
    void* data = take(round_up(n));
    if (data == nullptr) {
      return small_->allocate(n);  // the reserved range is full
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate/raw_deallocate (used inside libtorch) free through this, small
  // and large buffers alike.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  Figures figures() {
    std::lock_guard<std::mutex> lock(mutex_);
    return figures_;
  }

  static void release(void* data);

 private:
  static size_t round_up(size_t n) { return (n + kPage - 1) / kPage * kPage; }

  bool owns(void* data) const {
    auto* p = static_cast<char*>(data);
    return p >= base_ && p < base_ + kReserveBytes;
  }

  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t offset;
    // Best fit: the smallest free block that holds n (lowest address among equals).
    auto fit = free_by_size_.lower_bound({n, 0});
    if (fit != free_by_size_.end()) {
      offset = fit->second;
      const size_t size = fit->first;
      free_by_size_.erase(fit);
      blocks_[offset] = {n, false};
      if (size > n) {
        blocks_[offset + n] = {size - n, true};
        free_by_size_.insert({size - n, offset + n});
      }
      ++figures_.reused;
    } else {
      // Nothing fits: grow the extent, starting inside the last block if it is free.
      offset = extent_;
      if (!blocks_.empty()) {
        auto last = std::prev(blocks_.end());
        if (last->second.free) {
          offset = last->first;
          free_by_size_.erase({last->second.size, offset});
          blocks_.erase(last);
        }
      }
      if (offset + n > kReserveBytes) {
        if (offset != extent_) {  // put the last free block back as it was
          blocks_[offset] = {extent_ - offset, true};
          free_by_size_.insert({extent_ - offset, offset});
        }
        return nullptr;
      }
      blocks_[offset] = {n, false};
      extent_ = offset + n;
      figures_.extent = static_cast<int64_t>(extent_);
      ++figures_.grown;
    }
    figures_.in_use += static_cast<int64_t>(n);
    if (figures_.in_use > figures_.high_water) {
      figures_.high_water = figures_.in_use;
    }
    return base_ + offset;
  }

  void give_back(void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t offset = static_cast<size_t>(static_cast<char*>(data) - base_);
    auto it = blocks_.find(offset);
    if (it == blocks_.end() || it->second.free) {
      return;  // not a buffer handed out: never happens; ignoring it keeps the pool consistent
    }
    size_t size = it->second.size;
    figures_.in_use -= static_cast<int64_t>(size);
    // Merge with the free neighbours on both sides.
    auto next = std::next(it);
    if (next != blocks_.end() && next->second.free) {
      free_by_size_.erase({next->second.size, next->first});
      size += next->second.size;
      blocks_.erase(next);
    }
    if (it != blocks_.begin()) {
      auto prev = std::prev(it);
      if (prev->second.free) {
        free_by_size_.erase({prev->second.size, prev->first});
        offset = prev->first;
        size += prev->second.size;
        blocks_.erase(it);
        it = prev;
      }
    }
    it->second = {size, true};
    free_by_size_.insert({size, offset});
  }

  struct Block {
    size_t size;
    bool free;
  };

  c10::Allocator* small_;
  char* base_;
  std::mutex mutex_;
  std::map<size_t, Block> blocks_;                     // by offset, covering [0, extent_)
  std::set<std::pair<size_t, size_t>> free_by_size_;  // (size, offset) of the free blocks
  size_t extent_ = 0;
  Figures figures_;
};

LargeBufferPool* the_pool = nullptr;

void LargeBufferPool::release(void* data) {
  if (data == nullptr) {
    return;
  }
  if (the_pool->owns(data)) {
    the_pool->give_back(data);
    return;
  }
  // A small buffer (or one past the range) freed through raw_deleter().
  c10::DeleterFnPtr small_deleter = the_pool->small_->raw_deleter();
  if (small_deleter != nullptr) {
    small_deleter(data);
  } else {
    c10::free_cpu(data);
  }
}

}  // namespace

// Puts the pool in front of libtorch's CPU allocator; later calls only repeat
// the first one's answer. Returns 0, or -1 when the address range could not be
// reserved or libtorch refused the allocator.
extern "C" int stereo_recon_buffer_pool_install() {
  static std::once_flag once;
  static int status = -1;
  std::call_once(once, [] {
    try {
      void* base =
          mmap(nullptr, kReserveBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (base == MAP_FAILED) {
        return;
      }
      c10::Allocator* current = c10::GetCPUAllocator();
      // Leaked on purpose: tensors may outlive every static destructor.
      the_pool = new LargeBufferPool(current, static_cast<char*>(base));
      c10::SetCPUAllocator(the_pool, /*priority=*/1);
      status = c10::GetCPUAllocator() == the_pool ? 0 : -1;
    } catch (...) {
      status = -1;
    }
  });
  return status;
}

// The pool's figures; -1 before it is installed.
extern "C" int stereo_recon_buffer_pool_stats(int64_t* in_use, int64_t* extent, int64_t* high_water, int64_t* reused,
                                           int64_t* grown) {
  if (the_pool == nullptr) {
    return -1;
  }
  const Figures f = the_pool->figures();
  *in_use = f.in_use;
  *extent = f.extent;
  *high_water = f.high_water;
  *reused = f.reused;
  *grown = f.grown;
  return 0;
}
