//! The memory budget for pairs being received and decoded, shared by every
//! front end, so a flood of large or slow uploads cannot grow the process
//! without bound (the inference queue only bounds what waits for the model).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::PipelineError;

/// A global budget of bytes, counted in KiB.
#[derive(Clone)]
pub struct UploadBudget {
    semaphore: Arc<Semaphore>,
    total_kib: u32,
}

/// A share of the budget, given back when dropped.
pub type BudgetShare = OwnedSemaphorePermit;

impl UploadBudget {
    pub fn new(bytes: u64) -> UploadBudget {
        let total_kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).max(1);
        UploadBudget { semaphore: Arc::new(Semaphore::new(total_kib as usize)), total_kib }
    }

    /// A share of `bytes` of the budget, or `None` when it is not free now. A
    /// request larger than the whole budget takes all of it (it can then run
    /// alone rather than never).
    pub fn try_admit(&self, bytes: u64) -> Option<BudgetShare> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, self.total_kib);
        self.semaphore.clone().try_acquire_many_owned(kib).ok()
    }

    /// [`try_admit`](Self::try_admit), or the error a full budget answers.
    pub fn admit(&self, bytes: u64) -> Result<BudgetShare, PipelineError> {
        self.try_admit(bytes).ok_or(PipelineError::BudgetFull { budget_bytes: self.total_bytes() })
    }

    /// Bytes admitted now.
    pub fn in_use_bytes(&self) -> u64 {
        u64::from(self.total_kib - self.semaphore.available_permits() as u32) * 1024
    }

    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }
}

/// Bytes charged for decoding a pair of `width x height` images: the decoder's
/// buffer (at most 16-bit RGBA, 8 bytes a pixel) and the float RGB copy (12
/// bytes a pixel), for both images.
pub fn decoded_pair_bytes(width: u32, height: u32) -> u64 {
    2 * u64::from(width) * u64::from(height) * (8 + 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_up_to_its_total_and_frees_on_drop() {
        let budget = UploadBudget::new(10 * 1024);
        let a = budget.try_admit(6 * 1024).expect("fits");
        assert!(budget.try_admit(6 * 1024).is_none(), "over the budget");
        assert!(matches!(budget.admit(6 * 1024), Err(PipelineError::BudgetFull { budget_bytes: 10240 })));
        assert_eq!(budget.in_use_bytes(), 6 * 1024);
        drop(a);
        let all = budget.try_admit(100 * 1024).expect("a larger request takes the whole budget");
        assert_eq!(budget.in_use_bytes(), 10 * 1024);
        drop(all);
        assert_eq!(budget.in_use_bytes(), 0);
    }
}
