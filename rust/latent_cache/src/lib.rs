//! Pure Rust core of simpletuner-lcm's data path. Knows nothing about Python.
#![deny(missing_docs)]

pub mod bucket;
pub mod decode;
mod error;
mod pyrandom;
pub mod scan;
pub mod store;

pub use error::{CacheError, Result};

/// Version of this crate, reported by the Python binding.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

static GLOBAL_POOL_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Whether rayon's global pool belongs to this process. After a `fork` (PyTorch DataLoader workers) the child
/// inherits the pool's bookkeeping but none of its threads: work sent there would never run.
pub fn global_pool_usable() -> bool {
    let pid = std::process::id();
    *GLOBAL_POOL_PID.get_or_init(|| pid) == pid
}

/// Runs `f` on a rayon pool of `threads` workers. `None` means the global pool (one worker per core), or, in a
/// forked child whose parent already used it, a fresh pool of that size.
pub fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T> {
    if threads.is_none() && global_pool_usable() {
        return Ok(f());
    }
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build()
        .map_err(|e| CacheError::config("threads", e))?;
    Ok(pool.install(f))
}
