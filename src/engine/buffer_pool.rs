//! A pool for large CPU tensor buffers in front of libtorch's CPU allocator
//! (`buffer_pool.cpp`).
//!
//! Without it every activation of a pass (hundreds of 1-200 MiB tensors) is
//! mapped fresh from the kernel, zeroed page by page on first touch and
//! unmapped again: about a fifth of a CPU pass on two cores. The pool keeps
//! freed buffers mapped and carves later ones out of them (best fit, split,
//! merged with free neighbours), so a pass that repeats the last one's sizes
//! touches no new memory. The process holds what the pool has grown to.

/// The pool's figures, for the log and the speed bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferPoolStats {
    /// Bytes of large buffers held by live tensors.
    pub in_use_bytes: u64,
    /// How far the pool has grown: the memory it holds (free blocks included).
    pub extent_bytes: u64,
    /// Most bytes of large buffers in use at once: the least any allocator would need.
    pub high_water_bytes: u64,
    /// Large buffers carved from memory the pool already held.
    pub reused: u64,
    /// Large buffers for which the pool had to grow.
    pub grown: u64,
}

mod ffi {
    extern "C" {
        pub fn stereo_recon_buffer_pool_install() -> i32;
        pub fn stereo_recon_buffer_pool_stats(
            in_use: *mut i64,
            extent: *mut i64,
            high_water: *mut i64,
            reused: *mut i64,
            grown: *mut i64,
        ) -> i32;
    }
}

/// Puts the pool in front of libtorch's CPU allocator for the rest of the
/// process (it cannot be taken out again: live tensors point into it). Later
/// calls only repeat the first one's answer. Returns whether the pool is in
/// place.
pub fn install() -> bool {
    // SAFETY: takes no arguments, runs once (std::call_once) and catches every C++ exception.
    unsafe { ffi::stereo_recon_buffer_pool_install() == 0 }
}

/// The figures, or `None` when the pool was never installed.
pub fn stats() -> Option<BufferPoolStats> {
    let mut v = [0i64; 5];
    let [a, b, c, d, e] = &mut v;
    // SAFETY: the function only writes the five integers we pass.
    let status = unsafe { ffi::stereo_recon_buffer_pool_stats(a, b, c, d, e) };
    let u = |x: i64| x.max(0) as u64;
    (status == 0).then(|| BufferPoolStats {
        in_use_bytes: u(v[0]),
        extent_bytes: u(v[1]),
        high_water_bytes: u(v[2]),
        reused: u(v[3]),
        grown: u(v[4]),
    })
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    const MIB_OF_F32: i64 = 1 << 18;

    fn filled(mib: i64, value: f64) -> Tensor {
        Tensor::full([mib * MIB_OF_F32], value, (Kind::Float, Device::Cpu))
    }

    /// The smallest and largest value (no large temporary, unlike a sum in f64).
    fn range(t: &Tensor) -> (f64, f64) {
        (t.min().double_value(&[]), t.max().double_value(&[]))
    }

    // nextest runs each test in its own process, so the pool starts empty here.
    #[test]
    fn a_repeated_pass_reuses_the_pool_without_growing_it() {
        assert_eq!(super::stats(), None, "nothing before install");
        assert!(super::install());
        assert!(super::install(), "a second call answers like the first");
        let pass = || {
            let a = filled(4, 1.0);
            let b = filled(6, 2.0);
            drop(a);
            // Fits in a's block: split off, the rest stays free.
            let c = filled(2, 3.0);
            let small = Tensor::full([16], 4.0, (Kind::Float, Device::Cpu)); // below 1 MiB: not pooled
            (range(&b), range(&c), range(&small))
        };
        let first = pass();
        let after_first = super::stats().unwrap();
        assert_eq!(after_first.in_use_bytes, 0, "every buffer came back: {after_first:?}");
        assert_eq!(after_first.high_water_bytes, 10 << 20);
        assert_eq!(after_first.grown, 2, "a and b grew the pool, c fit in a's place: {after_first:?}");
        assert!(after_first.extent_bytes <= 10 << 20, "{after_first:?}");
        for _ in 0..3 {
            assert_eq!(pass(), first, "values are what was written");
            assert_eq!(first, ((2.0, 2.0), (3.0, 3.0), (4.0, 4.0)));
        }
        let after = super::stats().unwrap();
        assert_eq!((after.grown, after.extent_bytes), (after_first.grown, after_first.extent_bytes), "{after:?}");
        assert_eq!(after.reused, after_first.reused + 3 * 3);
        assert_eq!(after.in_use_bytes, 0);
    }

    #[test]
    fn freed_neighbours_merge_into_one_block() {
        assert!(super::install());
        let (a, b) = (filled(4, 1.0), filled(4, 1.0));
        drop(a);
        drop(b);
        // 8 MiB fits only in the two merged 4 MiB blocks.
        let c = filled(8, 5.0);
        assert_eq!(range(&c), (5.0, 5.0));
        let s = super::stats().unwrap();
        assert_eq!((s.grown, s.reused, s.extent_bytes), (2, 1, 8 << 20), "{s:?}");
        drop(c);
        // Bigger than anything free: the pool grows from the end of its last free block.
        let d = filled(12, 1.0);
        let s = super::stats().unwrap();
        assert_eq!((s.grown, s.extent_bytes, s.in_use_bytes), (3, 12 << 20, 12 << 20), "{s:?}");
        drop(d);
    }
}
