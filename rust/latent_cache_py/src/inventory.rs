//! Inventory binding: one folder scanned in Rust, its columns handed to Python.
use crate::errors::guarded;
use latent_cache::inventory::{self, Inventory, Options};
use latent_cache::memo::{CaptionRef, Token};
use pyo3::prelude::*;
use std::path::PathBuf;

/// The images of one data folder (sorted keys), with what the scan or its memo knows of each.
#[pyclass(name = "Inventory", module = "lcm_plugin._latent_cache", frozen)]
pub struct PyInventory {
    pub(crate) inner: std::sync::Arc<inventory::Inventory>,
}

#[pymethods]
impl PyInventory {
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Keys: paths relative to the folder, '/'-separated.
    #[getter]
    fn keys(&self) -> Vec<&str> {
        (0..self.inner.len()).map(|i| self.inner.key(i)).collect()
    }

    /// The key of image `index`.
    fn key(&self, index: usize) -> PyResult<&str> {
        if index >= self.inner.len() {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("no image {index}")));
        }
        Ok(self.inner.key(index))
    }

    /// Oriented (W, H) per image, None where the header could not be read (see `errors`).
    #[getter]
    fn sizes(&self) -> Vec<Option<(u32, u32)>> {
        (0..self.inner.len()).map(|i| self.inner.size(i).ok()).collect()
    }

    /// (index, message) of every image whose header could not be read.
    #[getter]
    fn errors(&self) -> Vec<(usize, &str)> {
        (0..self.inner.len()).filter_map(|i| self.inner.size(i).err().map(|why| (i, why))).collect()
    }

    /// 32 hex digits of each file's content hash (xxh3-128).
    #[getter]
    fn contents(&self) -> Vec<String> {
        (0..self.inner.len()).map(|i| format!("{:032x}", self.inner.content(i))).collect()
    }

    /// Caption file per image: its text, or None when there is none or it was not read; unreadable ones are in
    /// `caption_errors`.
    #[getter]
    fn captions(&self) -> Vec<Option<&str>> {
        let text = |i| if let CaptionRef::Text(_, t) = self.inner.caption(i) { Some(t) } else { None };
        (0..self.inner.len()).map(text).collect()
    }

    /// (index, reason) of every caption file that exists but cannot be read.
    #[getter]
    fn caption_errors(&self) -> Vec<(usize, &str)> {
        let why = |i| if let CaptionRef::Unreadable(_, why) = self.inner.caption(i) { Some((i, why)) } else { None };
        (0..self.inner.len()).filter_map(why).collect()
    }

    /// How many images this scan read from disk (new, or stamps changed); the rest came from the memo.
    #[getter]
    fn read(&self) -> usize {
        self.inner.read_count()
    }

    /// Images whose stamp changed but whose bytes did not.
    #[getter]
    fn touched(&self) -> usize {
        self.inner.touched
    }

    /// Images the memo listed that are gone.
    #[getter]
    fn removed(&self) -> usize {
        self.inner.removed
    }

    /// Whether a usable memo was found.
    #[getter]
    fn had_memo(&self) -> bool {
        self.inner.had_memo
    }

    /// Paths (as bytes) of the entries whose names are not UTF-8; they are not listed.
    #[getter]
    fn not_utf8(&self) -> Vec<Vec<u8>> {
        self.inner.not_utf8().map(<[u8]>::to_vec).collect()
    }

    /// Keys of the listed files that are not images read here (`other_extensions`).
    #[getter]
    fn others(&self) -> Vec<&str> {
        self.inner.others().collect()
    }

    /// (time, CRC) of the memo this inventory is, as it lies on disk (nothing changed since it was written); None
    /// when the scan changed anything and the memo is to be written again.
    #[getter]
    fn memo_token(&self) -> Option<Token> {
        self.inner.memo_token()
    }

    /// Every listed file (images and others) grouped by folder, as SimpleTuner's local backend lists them:
    /// (the folder's name under `root`, the files' paths under `absolute_root`), folders in key order.
    fn listing(&self, root: &str, absolute_root: &str) -> Vec<(String, Vec<String>)> {
        let join = |base: &str, rest: &str| if base.ends_with('/') { format!("{base}{rest}") } else { format!("{base}/{rest}") };
        let keys = (0..self.inner.len()).map(|i| self.inner.key(i)).chain(self.inner.others());
        by_folder(keys, |folder| if folder.is_empty() { root.to_string() } else { join(root, folder) }, |key| {
            join(absolute_root, key)
        })
    }

    /// Every listed object (images and others) as SimpleTuner's S3 backend lists a bucket: grouped by the key's
    /// folder (everything before its last '/', "" for none), folders and keys in key order, each file its whole key.
    fn bucket_listing(&self) -> Vec<(String, Vec<String>)> {
        let mut keys: Vec<&str> = (0..self.inner.len()).map(|i| self.inner.key(i)).chain(self.inner.others()).collect();
        keys.sort_unstable();
        by_folder(keys, str::to_string, str::to_string)
    }

    /// Writes this inventory as the memo at `path` (atomically); returns the memo's token.
    fn write_memo(&self, py: Python<'_>, path: PathBuf) -> PyResult<Token> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        py.allow_threads(|| guarded(|| inventory::write_memo(&path, &self.inner, now)))
    }
}

/// Scans `data_dir` for files ending in one of `extensions` (lower case, with the dot), reading each image's
/// header, content hash and, with `caption_extension`, its caption file, except where the memo at `memo` holds
/// them for unchanged stamps; files ending in one of `other_extensions` are listed only. Runs without the GIL on
/// rayon.
#[pyfunction(name = "scan_inventory")]
#[pyo3(signature = (data_dir, extensions, caption_extension=None, memo=None, threads=None, other_extensions=Vec::new()))]
pub fn scan_inventory_py(
    py: Python<'_>,
    data_dir: PathBuf,
    extensions: Vec<String>,
    caption_extension: Option<String>,
    memo: Option<PathBuf>,
    threads: Option<usize>,
    other_extensions: Vec<String>,
) -> PyResult<PyInventory> {
    let options = Options { extensions, other_extensions, caption_extension };
    let inner = py.allow_threads(|| {
        guarded(|| latent_cache::with_threads(threads, || inventory::scan(&data_dir, &options, memo.as_deref()))?)
    })?;
    Ok(PyInventory { inner: inner.into() })
}

/// The inventory of samples held inside other files (tar members, table rows), listed by their source: `keys`
/// (SimpleTuner's names) and per key the stamp `(size, mtime_ns, ctime_ns, place)` of where its bytes lie. What the
/// memo lacks for those stamps is read by calling `read(keys)`, `chunk` keys at a time, which returns
/// `(bytes or None per key, [(position, why)])` as `S3Bucket.get_all` does; headers and hashes are computed without
/// the GIL. `oriented`: sizes after the EXIF orientation (as SimpleTuner's metadata backend for the source sees them).
#[pyfunction(name = "scan_blobs")]
#[pyo3(signature = (keys, stamps, read, memo=None, oriented=true, chunk=256, threads=None))]
#[allow(clippy::too_many_arguments)]
pub fn scan_blobs_py(
    py: Python<'_>,
    keys: Vec<String>,
    stamps: Vec<(u64, i64, i64, u64)>,
    read: PyObject,
    memo: Option<PathBuf>,
    oriented: bool,
    chunk: usize,
    threads: Option<usize>,
) -> PyResult<PyInventory> {
    if keys.len() != stamps.len() {
        return Err(pyo3::exceptions::PyValueError::new_err(format!("{} keys but {} stamps", keys.len(), stamps.len())));
    }
    let listed: Vec<(String, inventory::Stamp)> = keys
        .into_iter()
        .zip(stamps)
        .map(|(key, (size, mtime_ns, ctime_ns, inode))| (key, inventory::Stamp { size, mtime_ns, ctime_ns, inode }))
        .collect();
    let mut failure: Option<PyErr> = None;
    let mut read_chunk = |keys: &[String]| -> latent_cache::Result<Vec<Result<Vec<u8>, String>>> {
        Python::with_gil(|py| {
            let answered = read
                .call1(py, (keys.to_vec(),))
                .and_then(|answer| answer.extract::<(Vec<Option<Vec<u8>>>, Vec<(usize, String)>)>(py));
            match answered {
                Ok((blobs, errors)) => {
                    let mut why: std::collections::HashMap<usize, String> = errors.into_iter().collect();
                    Ok(blobs
                        .into_iter()
                        .enumerate()
                        .map(|(i, blob)| blob.ok_or_else(|| why.remove(&i).unwrap_or_else(|| "not read".to_string())))
                        .collect())
                }
                Err(error) => {
                    let message = error.to_string();
                    failure = Some(error);
                    Err(latent_cache::CacheError::config("read", message))
                }
            }
        })
    };
    let scanned = py.allow_threads(|| {
        guarded(|| {
            latent_cache::with_threads(threads, || {
                inventory::scan_blobs(listed, memo.as_deref(), oriented, chunk, &mut read_chunk)
            })?
        })
    });
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(PyInventory { inner: scanned?.into() })
}

/// The inventory the memo at `path` holds, when its token is one of `tokens` (a machine's first rank scanned the
/// folder and confirmed or wrote that memo in this start): mapped, shared by the ranks of the machine, and no file
/// is stat'ed again. None when the memo is none of those any more, or cannot be read.
#[pyfunction(name = "inventory_of_memo")]
pub fn inventory_of_memo_py(py: Python<'_>, path: PathBuf, tokens: Vec<Token>) -> Option<PyInventory> {
    py.allow_threads(|| Inventory::of_memo(&path, &tokens)).map(|inner| PyInventory { inner: inner.into() })
}

/// `keys` grouped by their folder (everything before the last '/'), folders in the order they first appear: each
/// folder named by `folder_name`, each file by `file_name`.
fn by_folder<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    folder_name: impl Fn(&str) -> String,
    file_name: impl Fn(&str) -> String,
) -> Vec<(String, Vec<String>)> {
    let mut folders: Vec<(String, Vec<String>)> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for key in keys {
        let folder = key.rsplit_once('/').map_or("", |(folder, _)| folder);
        let slot = *index.entry(folder).or_insert_with(|| {
            folders.push((folder_name(folder), Vec::new()));
            folders.len() - 1
        });
        folders[slot].1.push(file_name(key));
    }
    folders
}
