//! The one error type of the core. Messages are lowercase and name the file or key in backticks.
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Every failure the data path reports.
#[derive(Debug)]
pub enum CacheError {
    /// An OS-level read or write failed.
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error (its kind decides `FileNotFoundError` in Python).
        source: io::Error,
    },
    /// The file starts with bytes of no supported image format.
    UnknownFormat {
        /// File involved.
        path: PathBuf,
    },
    /// The file claims a known format but its header or pixel data is broken or truncated.
    Decode {
        /// File involved.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The image has more pixels than the configured limit (decompression bomb guard).
    TooManyPixels {
        /// File involved.
        path: PathBuf,
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The limit that was exceeded.
        limit: u64,
    },
    /// A bucketing or decode setting is invalid.
    InvalidConfig {
        /// Setting name as written in multidatabackend.json.
        key: String,
        /// What is valid.
        reason: String,
    },
    /// A cache index or shard does not follow the cache format.
    Format {
        /// File involved.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A shard failed its checksum or size check; it is never served.
    CorruptShard {
        /// Shard file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A key is not in the cache.
    KeyNotFound {
        /// The key asked for.
        key: String,
    },
    /// A key was written twice by one writer.
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// The keys of one `gather` differ in dtype or shape.
    BatchMismatch {
        /// What differs, naming both keys.
        reason: String,
    },
    /// Another process (or another open writer) writes to the cache under the same writer name.
    WriterBusy {
        /// Cache directory.
        dir: PathBuf,
        /// Writer name.
        writer: String,
    },
    /// A bucket could not be opened or listed (after the client's retries).
    Remote {
        /// `s3://bucket/prefix` involved.
        location: String,
        /// What the server or the connection said.
        reason: String,
    },
}

impl CacheError {
    /// Wraps an io error with the path it concerns.
    pub fn io(path: &Path, source: io::Error) -> Self {
        CacheError::Io { path: path.to_path_buf(), source }
    }

    /// A decode error for `path`.
    pub fn decode(path: &Path, reason: impl fmt::Display) -> Self {
        CacheError::Decode { path: path.to_path_buf(), reason: reason.to_string() }
    }

    /// A format error for `path`.
    pub fn format(path: &Path, reason: impl fmt::Display) -> Self {
        CacheError::Format { path: path.to_path_buf(), reason: reason.to_string() }
    }

    /// An invalid-setting error.
    pub fn config(key: &str, reason: impl fmt::Display) -> Self {
        CacheError::InvalidConfig { key: key.to_string(), reason: reason.to_string() }
    }
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Io { path, source } => write!(f, "cannot access `{}`: {source}", path.display()),
            CacheError::UnknownFormat { path } => {
                write!(f, "`{}` is not a supported image (jpeg, png, webp, gif, bmp)", path.display())
            }
            CacheError::Decode { path, reason } => write!(f, "cannot decode `{}`: {reason}", path.display()),
            CacheError::TooManyPixels { path, width, height, limit } => write!(
                f,
                "`{}` is {width}x{height} = {} pixels, over the limit of {limit} (possible decompression bomb)",
                path.display(),
                u64::from(*width) * u64::from(*height)
            ),
            CacheError::InvalidConfig { key, reason } => write!(f, "invalid setting `{key}`: {reason}"),
            CacheError::Format { path, reason } => write!(f, "bad cache file `{}`: {reason}", path.display()),
            CacheError::CorruptShard { path, reason } => {
                write!(f, "corrupt cache shard `{}`: {reason}", path.display())
            }
            CacheError::KeyNotFound { key } => write!(f, "key `{key}` is not in the cache"),
            CacheError::DuplicateKey { key } => write!(f, "key `{key}` was already written"),
            CacheError::BatchMismatch { reason } => write!(f, "gather: {reason}"),
            CacheError::WriterBusy { dir, writer } => write!(
                f,
                "cache `{}` is already being written as writer `{writer}` (`{}` is locked by another process or writer); \
                 give each process its own writer name (e.g. its RANK)",
                dir.display(),
                crate::store::lock_path(dir, writer).display()
            ),
            CacheError::Remote { location, reason } => write!(f, "cannot read `{location}`: {reason}"),
        }
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CacheError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result alias of the core.
pub type Result<T> = std::result::Result<T, CacheError>;
