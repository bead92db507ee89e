// The CUDA caching allocator's statistics, for the metrics endpoint.
//
// tch exposes no allocator statistics, and they live behind C++ only
// (c10::cuda::CUDACachingAllocator), so this one function reads them and hands
// plain integers to Rust. Compiled by build.rs when libtorch has CUDA and the
// CUDA runtime headers are installed next to it (the torch wheel's nvidia
// packages); otherwise the Rust side reports no CUDA memory.

#include <c10/cuda/CUDACachingAllocator.h>

#include <cstdint>

extern "C" int stereo_recon_cuda_allocated_bytes(int device, int64_t* current, int64_t* peak) {
  try {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto& aggregate = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    *current = aggregate.current;
    *peak = aggregate.peak;
    return 0;
  } catch (...) {
    // No CUDA device, allocator not initialised, or any c10 error: no figures.
    return -1;
  }
}
