//! Pure Rust core of simpletuner-lcm's data path. Knows nothing about Python.
#![deny(missing_docs)]

/// Version of this crate, reported by the Python binding.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
