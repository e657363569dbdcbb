//! Admission by KV-cache bytes: every session reserves the memory its cache
//! can grow to when it opens, against a budget taken from the device (free
//! GPU memory after the model loaded, through cudarc), from RAM on CPU, or
//! from `--kv-budget-mib`. A session that does not fit is refused at once
//! with RESOURCE_EXHAUSTED naming the bytes; it is never admitted to fail
//! later with an out-of-memory error in the middle of a generation.
//!
//! Counting sessions alone cannot do this: 64 sessions of a 7B fp16 target
//! at 1k context need 64 × 512 MiB of cache, more than any GPU has.

use std::sync::{Arc, Mutex};

use duo_core::runtime::{Device, ModelInfo};
use tonic::Status;

/// Share of the free memory measured at start-up that the budget takes by
/// default: the rest is headroom for ONNX Runtime's activations and for the
/// one transient copy of a cache a forward or an edit makes.
pub const DEFAULT_BUDGET_SHARE: f64 = 0.8;

/// Bytes of cache one token takes: key and value, every layer, every KV head.
pub fn bytes_per_token(info: &ModelInfo) -> u64 {
    let elem = match info.kv_dtype {
        duo_core::runtime::model::KvDType::F32 => 4,
        duo_core::runtime::model::KvDType::F16 => 2,
    };
    (2 * info.num_layers * info.kv_heads * info.head_dim * elem) as u64
}

/// The budget and what open sessions have reserved of it.
#[derive(Clone, Debug)]
pub struct KvBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    budget: u64,
    per_token: u64,
    context_len: usize,
    reserved: Mutex<u64>,
}

/// One session's reservation; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut r = self
            .inner
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *r = r.saturating_sub(self.bytes);
        metrics::gauge!("duo_target_kv_reserved_bytes").set(*r as f64);
    }
}

impl KvBudget {
    /// A budget of `budget` bytes for a model of `info` (its context length
    /// caps what one session may ask for; `DEFAULT_CONTEXT_LEN` when
    /// undeclared).
    pub fn new(budget: u64, info: &ModelInfo) -> Self {
        metrics::gauge!("duo_target_kv_budget_bytes").set(budget as f64);
        metrics::gauge!("duo_target_kv_reserved_bytes").set(0.0);
        Self {
            inner: Arc::new(Inner {
                budget,
                per_token: bytes_per_token(info),
                context_len: info
                    .context_len
                    .unwrap_or(duo_core::engine::driver::DEFAULT_CONTEXT_LEN),
                reserved: Mutex::new(0),
            }),
        }
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// Reserves the cache of a session that holds at most `max_context`
    /// tokens (0 or more than the model's context: the model's context).
    pub fn reserve(&self, max_context: u32) -> Result<Reservation, Status> {
        let tokens = match max_context as usize {
            0 => self.inner.context_len,
            n => n.min(self.inner.context_len),
        };
        let bytes = tokens as u64 * self.inner.per_token;
        let mut r = self
            .inner
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *r + bytes > self.inner.budget {
            metrics::counter!("duo_target_kv_refusals_total").increment(1);
            return Err(Status::resource_exhausted(format!(
                "the target's KV cache budget is full: this session needs {} ({tokens} tokens x {} B) but {} of {} are reserved by open sessions; retry later, ask for fewer tokens (max_tokens), or raise --kv-budget-mib",
                mib(bytes),
                self.inner.per_token,
                mib(*r),
                mib(self.inner.budget)
            )));
        }
        *r += bytes;
        metrics::gauge!("duo_target_kv_reserved_bytes").set(*r as f64);
        Ok(Reservation {
            inner: Arc::clone(&self.inner),
            bytes,
        })
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The default budget: [`DEFAULT_BUDGET_SHARE`] of the memory free now on
/// `device` (GPU memory through cudarc; `MemAvailable` from /proc/meminfo on
/// CPU). `None` when it cannot be measured (then the caller must be told to
/// pass --kv-budget-mib).
pub fn measured_default(device: Device) -> Option<u64> {
    let free = match device {
        Device::Cpu => available_ram(),
        Device::Cuda(n) => crate::devices::free_memory(n).ok(),
    }?;
    Some((free as f64 * DEFAULT_BUDGET_SHARE) as u64)
}

fn available_ram() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use duo_core::runtime::model::KvDType;

    fn info() -> ModelInfo {
        ModelInfo {
            path: "m".into(),
            num_layers: 2,
            kv_heads: 2,
            head_dim: 4,
            kv_dtype: KvDType::F16,
            vocab_size: 10,
            padded_vocab_size: 10,
            has_position_ids: true,
            context_len: Some(100),
            eos_token_id: None,
            eos_token_ids: Vec::new(),
            provider: "CPU",
            intra_threads: 1,
        }
    }

    #[test]
    fn sessions_reserve_until_the_budget_is_full_and_release_on_drop() {
        // 2 x 2 layers x 2 heads x 4 dims x 2 B = 64 B per token.
        assert_eq!(bytes_per_token(&info()), 64);
        let b = KvBudget::new(64 * 150, &info());
        let first = b.reserve(100).unwrap();
        let refused = b.reserve(60).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("needs 0.0 MiB (60 tokens x 64 B)"),
            "{}",
            refused.message()
        );
        let second = b.reserve(50).unwrap();
        drop(first);
        // 0 asks for the model's context (100 tokens); so does 1000.
        let third = b.reserve(0).unwrap();
        assert!(b.reserve(1000).is_err());
        drop((second, third));
        assert!(b.reserve(1000).is_ok());
    }
}
