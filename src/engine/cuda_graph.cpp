// CUDA graphs for the engine: record one forward pass of the network once, then
// replay all of its kernels with a single launch.
//
// tch wraps no part of at::cuda::CUDAGraph, so this file hands Rust an opaque
// handle and four calls (begin, end, replay, free). Rust runs the forward pass
// between begin and end with its usual tch calls: while capturing, the current
// stream is a side stream from libtorch's pool (capture is not allowed on the
// default stream), so every kernel libtorch launches there is recorded instead
// of run, and every tensor allocated meanwhile comes from the graph's private
// memory pool, which stays reserved for replays. Each call catches every C++
// exception and reports it as text: nothing unwinds into Rust.

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>

namespace {

struct Capture {
  at::cuda::CUDAGraph graph;
  // The stream that was current before capture began, restored at its end.
  std::optional<c10::cuda::CUDAStream> previous;
  bool capturing = false;
};

void write_error(char* buffer, size_t length, const char* what) {
  if (buffer != nullptr && length > 0) {
    std::snprintf(buffer, length, "%s", what);
  }
}

// Ends a capture that is still open and puts the previous stream back.
void finish_capture(Capture& capture) {
  if (capture.capturing) {
    capture.capturing = false;
    capture.graph.capture_end();
  }
  if (capture.previous) {
    c10::cuda::setCurrentCUDAStream(*capture.previous);
    capture.previous.reset();
  }
}

}  // namespace

// Starts recording on `device`. Returns the handle, or null with the reason in `error`.
extern "C" void* stereo_recon_graph_begin(int device, char* error, size_t error_length) {
  try {
    auto capture = std::make_unique<Capture>();
    const auto index = static_cast<c10::DeviceIndex>(device);
    // Work queued on the default stream must be finished before the side stream records.
    c10::cuda::getCurrentCUDAStream(index).synchronize();
    capture->previous = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
    capture->graph.capture_begin();
    capture->capturing = true;
    return capture.release();
  } catch (const std::exception& e) {
    write_error(error, error_length, e.what());
  } catch (...) {
    write_error(error, error_length, "unknown C++ exception when starting a CUDA graph capture");
  }
  return nullptr;
}

// Stops recording and makes the graph replayable; 0 on success. On failure the
// handle is still valid and must be freed (the capture is closed either way).
extern "C" int stereo_recon_graph_end(void* handle, char* error, size_t error_length) {
  auto* capture = static_cast<Capture*>(handle);
  try {
    finish_capture(*capture);
    return 0;
  } catch (const std::exception& e) {
    write_error(error, error_length, e.what());
  } catch (...) {
    write_error(error, error_length, "unknown C++ exception when ending a CUDA graph capture");
  }
  // capture_end threw: the stream may still be current; put it back.
  try {
    if (capture->previous) {
      c10::cuda::setCurrentCUDAStream(*capture->previous);
      capture->previous.reset();
    }
  } catch (...) {
  }
  return -1;
}

// Launches the recorded kernels on the current stream; 0 on success.
extern "C" int stereo_recon_graph_replay(void* handle, char* error, size_t error_length) {
  try {
    static_cast<Capture*>(handle)->graph.replay();
    return 0;
  } catch (const std::exception& e) {
    write_error(error, error_length, e.what());
  } catch (...) {
    write_error(error, error_length, "unknown C++ exception when replaying a CUDA graph");
  }
  return -1;
}

// Frees the graph (closing a capture left open by a failed forward pass). Its
// memory pool returns to the caching allocator once no tensor of it is alive.
extern "C" void stereo_recon_graph_free(void* handle) {
  auto* capture = static_cast<Capture*>(handle);
  try {
    finish_capture(*capture);
  } catch (...) {
  }
  try {
    delete capture;
  } catch (...) {
  }
}

// Gives the caching allocator's unused blocks back to the driver (after a
// capture, the eager passes' blocks would otherwise stay reserved beside the
// graph's own pool).
extern "C" void stereo_recon_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
  } catch (...) {
  }
}
