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

/// Runs `f` on a rayon pool of `threads` workers (`None`: the global pool, one worker per core).
pub fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T> {
    match threads {
        None => Ok(f()),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .build()
                .map_err(|e| CacheError::config("threads", e))?;
            Ok(pool.install(f))
        }
    }
}
