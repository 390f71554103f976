//! Pure Rust core of simpletuner-lcm's data path. Knows nothing about Python.
#![deny(missing_docs)]

pub mod bucket;
pub mod decode;
pub mod inventory;
pub mod memo;
pub mod plan;
mod error;
mod pyrandom;
pub mod remote;
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

/// Pools built for an explicit thread count, with the process that built them. Kept for the process's life:
/// a fresh pool per call would respawn its threads and lose their warm per-thread decode buffers each batch.
static POOLS: std::sync::Mutex<Vec<(u32, usize, std::sync::Arc<rayon::ThreadPool>)>> = std::sync::Mutex::new(Vec::new());

/// Runs `f` on a rayon pool of `threads` workers. `None` means the global pool (one worker per core), or, in a
/// forked child whose parent already used it, a pool of that size.
pub fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T> {
    if threads.is_none() && global_pool_usable() {
        return Ok(f());
    }
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    Ok(pool(n)?.install(f))
}

fn pool(n: usize) -> Result<std::sync::Arc<rayon::ThreadPool>> {
    let pid = std::process::id();
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, p)) = pools.iter().find(|(owner, size, _)| *owner == pid && *size == n) {
        return Ok(p.clone());
    }
    // Pools inherited through `fork` have no threads here; they are forgotten, never dropped (dropping one would
    // talk to threads that do not exist in this process).
    for entry in std::mem::take(&mut *pools) {
        if entry.0 == pid {
            pools.push(entry);
        } else {
            std::mem::forget(entry);
        }
    }
    let built = rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| CacheError::config("threads", e))?;
    let built = std::sync::Arc::new(built);
    pools.push((pid, n, built.clone()));
    Ok(built)
}
