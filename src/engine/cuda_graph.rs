//! CUDA graphs: one forward pass recorded once per input shape, then replayed
//! with a single launch instead of the hundreds of kernel launches TorchScript
//! makes from the CPU (see `cuda_graph.cpp` for how recording works).
//!
//! Only the engine thread uses these, one at a time; a graph's input and
//! output tensors (owned by the caller) must outlive it and keep their storage.

#[cfg(stereo_recon_cuda_shims)]
mod ffi {
    use std::ffi::c_void;
    extern "C" {
        pub fn stereo_recon_graph_begin(device: i32, error: *mut u8, error_length: usize) -> *mut c_void;
        pub fn stereo_recon_graph_end(handle: *mut c_void, error: *mut u8, error_length: usize) -> i32;
        pub fn stereo_recon_graph_replay(handle: *mut c_void, error: *mut u8, error_length: usize) -> i32;
        pub fn stereo_recon_graph_free(handle: *mut c_void);
        pub fn stereo_recon_cuda_empty_cache();
    }
}

/// Whether this build can record CUDA graphs at all.
pub const AVAILABLE: bool = cfg!(stereo_recon_cuda_shims);

/// A recorded, replayable CUDA graph.
pub struct CudaGraph {
    #[cfg(stereo_recon_cuda_shims)]
    handle: std::ptr::NonNull<std::ffi::c_void>,
}

#[cfg(stereo_recon_cuda_shims)]
fn error_text(buffer: &[u8]) -> String {
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    let text = String::from_utf8_lossy(&buffer[..end]);
    // libtorch appends long C++ backtraces; the first line says what happened.
    text.lines().next().unwrap_or("CUDA graph error").to_owned()
}

impl CudaGraph {
    /// Records everything `body` launches on CUDA device `device` into a graph.
    /// `body` runs with a capture stream current: its kernels are recorded, not
    /// run, and the tensors it allocates live in the graph's memory pool. On
    /// any failure the capture is closed and the previous stream restored.
    pub fn record<T, E: std::fmt::Display>(
        device: usize,
        body: impl FnOnce() -> Result<T, E>,
    ) -> Result<(CudaGraph, T), String> {
        #[cfg(stereo_recon_cuda_shims)]
        {
            let mut error = [0u8; 512];
            // SAFETY: the shim writes at most `error.len()` bytes (NUL-terminated) and returns null on failure.
            let raw = unsafe { ffi::stereo_recon_graph_begin(device as i32, error.as_mut_ptr(), error.len()) };
            let handle = std::ptr::NonNull::new(raw).ok_or_else(|| error_text(&error))?;
            // From here, dropping `graph` closes the capture and frees it.
            let graph = CudaGraph { handle };
            let value = body().map_err(|e| format!("recording the forward pass: {e}"))?;
            // SAFETY: `handle` is a live capture from `begin`; the error buffer as above.
            let status = unsafe { ffi::stereo_recon_graph_end(graph.handle.as_ptr(), error.as_mut_ptr(), error.len()) };
            if status != 0 {
                return Err(error_text(&error));
            }
            Ok((graph, value))
        }
        #[cfg(not(stereo_recon_cuda_shims))]
        {
            let _ = (device, body);
            Err("this build has no CUDA graph support (libtorch without CUDA, or no CUDA headers at build time)".into())
        }
    }

    /// Launches the recorded kernels on the current stream (asynchronously).
    pub fn replay(&self) -> Result<(), String> {
        #[cfg(stereo_recon_cuda_shims)]
        {
            let mut error = [0u8; 512];
            // SAFETY: `handle` is a finished graph owned by `self`.
            let status =
                unsafe { ffi::stereo_recon_graph_replay(self.handle.as_ptr(), error.as_mut_ptr(), error.len()) };
            if status != 0 {
                return Err(error_text(&error));
            }
            Ok(())
        }
        #[cfg(not(stereo_recon_cuda_shims))]
        {
            Err("this build has no CUDA graph support".into())
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(stereo_recon_cuda_shims)]
        // SAFETY: `handle` came from `begin` and is freed exactly once, here.
        unsafe {
            ffi::stereo_recon_graph_free(self.handle.as_ptr())
        }
    }
}

/// Returns the CUDA caching allocator's unused blocks to the driver, so that
/// memory held for eager passes does not stay reserved beside graph pools.
pub fn empty_cache() {
    #[cfg(stereo_recon_cuda_shims)]
    // SAFETY: takes no arguments and catches every C++ exception.
    unsafe {
        ffi::stereo_recon_cuda_empty_cache()
    }
}
