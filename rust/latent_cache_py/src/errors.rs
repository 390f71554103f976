//! Python exceptions of the binding and the one `CacheError -> PyErr` mapping.
use latent_cache::CacheError;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;

create_exception!(lcm_plugin._latent_cache, LatentCacheError, PyException, "Base class of every data-path error.");
create_exception!(lcm_plugin._latent_cache, ImageDecodeError, LatentCacheError, "A file is not a readable image.");
create_exception!(lcm_plugin._latent_cache, ImageTooLargeError, LatentCacheError, "An image exceeds the pixel limit.");
create_exception!(lcm_plugin._latent_cache, BucketConfigError, LatentCacheError, "An invalid bucketing or decode setting.");
create_exception!(lcm_plugin._latent_cache, CacheFormatError, LatentCacheError, "A cache index or shard breaks the format.");
create_exception!(lcm_plugin._latent_cache, CorruptShardError, LatentCacheError, "A shard failed verification.");
create_exception!(lcm_plugin._latent_cache, MissingKeyError, LatentCacheError, "A key is not in the cache.");
create_exception!(lcm_plugin._latent_cache, DuplicateKeyError, LatentCacheError, "A key was written twice.");
create_exception!(lcm_plugin._latent_cache, CacheIOError, LatentCacheError, "An OS-level read or write failed.");
create_exception!(lcm_plugin._latent_cache, RemoteReadError, LatentCacheError, "A bucket could not be opened or listed.");
create_exception!(
    lcm_plugin._latent_cache,
    WriterLockedError,
    LatentCacheError,
    "Another process (or open writer) writes to the cache under the same writer name."
);

/// Maps a core error to its Python exception; a missing file becomes `FileNotFoundError`, a mixed `gather` batch
/// `ValueError` (as a wrong `out` buffer does).
pub fn to_py(err: CacheError) -> PyErr {
    let msg = err.to_string();
    match err {
        CacheError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        CacheError::Io { .. } => CacheIOError::new_err(msg),
        CacheError::UnknownFormat { .. } | CacheError::Decode { .. } => ImageDecodeError::new_err(msg),
        CacheError::TooManyPixels { .. } => ImageTooLargeError::new_err(msg),
        CacheError::InvalidConfig { .. } => BucketConfigError::new_err(msg),
        CacheError::Format { .. } => CacheFormatError::new_err(msg),
        CacheError::CorruptShard { .. } => CorruptShardError::new_err(msg),
        CacheError::KeyNotFound { .. } => MissingKeyError::new_err(msg),
        CacheError::DuplicateKey { .. } => DuplicateKeyError::new_err(msg),
        CacheError::WriterBusy { .. } => WriterLockedError::new_err(msg),
        CacheError::BatchMismatch { .. } => PyValueError::new_err(msg),
        CacheError::Remote { .. } => RemoteReadError::new_err(msg),
    }
}

/// Runs `f`, turning a Rust panic (a bug) into `LatentCacheError` instead of letting it reach Python.
pub fn guarded<T>(f: impl FnOnce() -> latent_cache::Result<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.py(),
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            Err(LatentCacheError::new_err(format!("internal error in the latent cache (please report it): {}", what.unwrap_or_default())))
        }
    }
}

/// `Result` conversion used by every binding function.
pub trait IntoPy<T> {
    /// Maps the error with [`to_py`].
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for latent_cache::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Registers the exception classes on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("LatentCacheError", py.get_type::<LatentCacheError>())?;
    m.add("ImageDecodeError", py.get_type::<ImageDecodeError>())?;
    m.add("ImageTooLargeError", py.get_type::<ImageTooLargeError>())?;
    m.add("BucketConfigError", py.get_type::<BucketConfigError>())?;
    m.add("CacheFormatError", py.get_type::<CacheFormatError>())?;
    m.add("CorruptShardError", py.get_type::<CorruptShardError>())?;
    m.add("MissingKeyError", py.get_type::<MissingKeyError>())?;
    m.add("DuplicateKeyError", py.get_type::<DuplicateKeyError>())?;
    m.add("CacheIOError", py.get_type::<CacheIOError>())?;
    m.add("WriterLockedError", py.get_type::<WriterLockedError>())?;
    m.add("RemoteReadError", py.get_type::<RemoteReadError>())?;
    Ok(())
}
