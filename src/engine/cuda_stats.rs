//! How many bytes the CUDA caching allocator holds for tensors now and at its
//! peak, for `/metrics`. Read on the engine thread after each job (see
//! `model::run_engine`), so scraping never calls into CUDA.

/// The allocator's tensor memory on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    /// Bytes allocated to tensors now.
    pub allocated_bytes: u64,
    /// Most bytes ever allocated to tensors at once since the process started.
    pub peak_allocated_bytes: u64,
}

#[cfg(stereo_recon_cuda_shims)]
mod ffi {
    extern "C" {
        pub fn stereo_recon_cuda_allocated_bytes(device: i32, current: *mut i64, peak: *mut i64) -> i32;
    }
}

/// The figures for CUDA device `index`; `None` when they cannot be had (no
/// CUDA in this build, no such device, allocator not in use yet).
pub fn read(index: usize) -> Option<CudaMemory> {
    #[cfg(stereo_recon_cuda_shims)]
    {
        let (mut current, mut peak) = (0i64, 0i64);
        // SAFETY: the function only writes the two integers we pass and catches every C++ exception.
        let status = unsafe { ffi::stereo_recon_cuda_allocated_bytes(index as i32, &mut current, &mut peak) };
        (status == 0)
            .then(|| CudaMemory { allocated_bytes: current.max(0) as u64, peak_allocated_bytes: peak.max(0) as u64 })
    }
    #[cfg(not(stereo_recon_cuda_shims))]
    {
        let _ = index;
        None
    }
}

/// Whether this build can read the allocator at all.
pub const AVAILABLE: bool = cfg!(stereo_recon_cuda_shims);

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_cuda_device_there_are_no_figures_and_no_crash() {
        if tch::Cuda::is_available() {
            return; // a GPU machine: covered by the metrics test instead
        }
        assert_eq!(super::read(0), None);
    }
}
