//! Latent cache bindings: writer, mmap reader with zero-copy shard arrays and private per-key views, check/verify.
use crate::errors::guarded;
use latent_cache::store::{self, CacheReader, CacheWriter, CheckOptions, Dtype, ShardFault};
use memmap2::MmapMut;
use numpy::ndarray::{ArrayView1, ArrayViewMut1};
use numpy::{PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::IntoPyDict;
use std::path::PathBuf;
use std::sync::Arc;

/// Writes tensors (given as raw bytes + safetensors dtype + shape) into sealed shards.
#[pyclass(name = "CacheWriter", module = "lcm_plugin._latent_cache")]
pub struct PyCacheWriter {
    inner: CacheWriter,
}

#[pymethods]
impl PyCacheWriter {
    /// Raises `WriterLockedError` when another process or open writer holds `writer` on `directory`.
    #[new]
    #[pyo3(signature = (directory, writer="rank0", shard_bytes=256 << 20))]
    fn new(py: Python<'_>, directory: PathBuf, writer: &str, shard_bytes: usize) -> PyResult<Self> {
        Ok(PyCacheWriter { inner: py.allow_threads(|| guarded(|| CacheWriter::open(&directory, writer, shard_bytes)))? })
    }

    /// Queues `data` (a C-contiguous uint8 view of the tensor) under `key`; may seal a shard.
    fn put(&mut self, py: Python<'_>, key: &str, dtype: &str, shape: Vec<usize>, data: PyReadonlyArrayDyn<'_, u8>) -> PyResult<()> {
        let bytes = data.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?.to_vec();
        let inner = &mut self.inner;
        py.allow_threads(|| guarded(|| inner.put(key, Dtype::parse(dtype)?, shape, bytes)))
    }

    /// Seals pending tensors into a shard (temp file, fsync, rename) and appends it to the journal.
    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.allow_threads(|| guarded(|| inner.commit()))
    }

    /// Commits, compacts the index journal and releases the writer lock.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.allow_threads(|| guarded(|| inner.close()))
    }

    fn __contains__(&self, key: &str) -> bool {
        self.inner.contains(key)
    }

    /// Shards sealed by this writer so far.
    #[getter]
    fn shard_count(&self) -> usize {
        self.inner.shard_count()
    }
}

/// Owner of the mapped shards; numpy arrays returned by `shard_array` keep it alive as their base.
#[pyclass(name = "CacheReader", module = "lcm_plugin._latent_cache", frozen)]
pub struct PyCacheReader {
    pub(crate) inner: Arc<CacheReader>,
}

/// One key's private copy-on-write mapping, the base object of the writable array `private_array` returns.
#[pyclass(module = "lcm_plugin._latent_cache", frozen)]
struct PrivateView {
    map: std::sync::Mutex<MmapMut>,
}

type Location = (usize, usize, usize, &'static str, Vec<usize>);
type PrivateArray<'py> = (Bound<'py, PyArray1<u8>>, &'static str, Vec<usize>);

#[pymethods]
impl PyCacheReader {
    #[new]
    #[pyo3(signature = (directory, verify=true))]
    fn new(py: Python<'_>, directory: PathBuf, verify: bool) -> PyResult<Self> {
        Ok(PyCacheReader { inner: Arc::new(py.allow_threads(|| guarded(|| CacheReader::open(&directory, verify)))?) })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, key: &str) -> bool {
        self.inner.contains(key)
    }

    /// Sorted keys.
    fn keys(&self) -> Vec<String> {
        self.inner.keys()
    }

    /// Shard file paths, indexed by the shard number `locate` returns.
    fn shard_paths(&self) -> Vec<PathBuf> {
        self.inner.shard_paths()
    }

    /// (shard, byte offset, byte length, dtype, shape) of `key`, after its shard passed its checks (unchanged on
    /// disk since opening; CRC on first use with `verify`).
    fn locate(&self, py: Python<'_>, key: &str) -> PyResult<Location> {
        let inner = &self.inner;
        let e = py.allow_threads(|| guarded(|| inner.locate(key).cloned()))?;
        Ok((e.shard, e.offset, e.len, e.dtype.name(), e.shape))
    }

    /// The whole shard as a read-only, zero-copy `uint8` array over the memory map.
    fn shard_array<'py>(slf: &Bound<'py, Self>, shard: usize) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let py = slf.py();
        let reader = &slf.get().inner;
        if shard >= reader.shard_count() {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("shard {shard} out of range")));
        }
        let data = py.allow_threads(|| guarded(|| reader.shard_data(shard).map(|d| (d.as_ptr() as usize, d.len()))))?;
        // SAFETY: the bytes live in an Mmap owned by `reader`'s Arc, which `slf` (the array's base object)
        // keeps alive for the array's lifetime; the map is read-only and the array is marked non-writeable below.
        let array = unsafe {
            let view = ArrayView1::from_shape_ptr(data.1, data.0 as *const u8);
            PyArray1::borrow_from_array(&view, slf.clone().into_any())
        };
        array.call_method("setflags", (), Some(&[("write", false)].into_py_dict(py)?))?;
        Ok(array)
    }

    /// `key` as a writable `uint8` array over a private copy-on-write mapping of its bytes (zero-copy until
    /// written; writes change neither the file nor later reads), with its dtype and shape.
    fn private_array<'py>(&self, py: Python<'py>, key: &str) -> PyResult<PrivateArray<'py>> {
        let inner = &self.inner;
        let (map, dtype, shape) = py.allow_threads(|| guarded(|| inner.get_private(key).map(|(m, e)| (m, e.dtype.name(), e.shape.clone()))))?;
        let owner = Bound::new(py, PrivateView { map: std::sync::Mutex::new(map) })?;
        let (ptr, len) = {
            let mut map = owner.get().map.lock().unwrap_or_else(|e| e.into_inner());
            (map.as_mut_ptr() as usize, map.len())
        };
        // SAFETY: the mapping is owned by `owner`, the array's base object, which outlives the array; the
        // mapping is private and writable, and nothing else holds a pointer into it.
        let array = unsafe {
            let view = ArrayViewMut1::from_shape_ptr(len, ptr as *mut u8);
            PyArray1::borrow_from_array(&view.view(), owner.into_any())
        };
        Ok((array, dtype, shape))
    }

    /// Copies the tensors of `keys` (one dtype and shape, checked per key) into `out` (a writable C-contiguous
    /// `uint8` array of exactly N × nbytes bytes, e.g. a reused batch buffer) or, without it, into a new
    /// `uint8 [N, nbytes]` array; in parallel without the GIL, by `pread`. Returns the array written.
    #[pyo3(signature = (keys, out=None))]
    fn gather<'py>(&self, py: Python<'py>, keys: Vec<String>, out: Option<Bound<'py, PyArrayDyn<u8>>>) -> PyResult<Bound<'py, PyAny>> {
        let inner = &self.inner;
        let len = match keys.first() {
            Some(k) => py.allow_threads(|| guarded(|| inner.locate(k).map(|e| e.len)))?,
            None => 0,
        };
        let out = match out {
            Some(array) => {
                if Some(array.len()) != len.checked_mul(keys.len()) {
                    return Err(PyValueError::new_err(format!(
                        "gather: `out` has {} bytes, {} keys of {len} bytes need {}",
                        array.len(),
                        keys.len(),
                        len.saturating_mul(keys.len())
                    )));
                }
                array.into_any()
            }
            // Uninitialised: every byte is written below (or the array is dropped with the error).
            None => unsafe { PyArray2::<u8>::new(py, [keys.len(), len], false) }.into_any(),
        };
        {
            let array = out.downcast::<PyArrayDyn<u8>>()?;
            let mut view = array.try_readwrite().map_err(|e| PyValueError::new_err(format!("gather: `out` is not writable: {e}")))?;
            let bytes = view.as_slice_mut().map_err(|e| PyValueError::new_err(format!("gather: `out` must be C-contiguous: {e}")))?;
            py.allow_threads(|| guarded(|| inner.gather(&keys, bytes)))?;
        }
        Ok(out)
    }
}

/// Checks every shard of `directory`; returns (shard path, reason) per failure. `repair` deletes proven-bad
/// shards of this cache and drops them, and foreign entries, from their index.
#[pyfunction(name = "verify")]
#[pyo3(signature = (directory, repair=false))]
pub fn verify_py(py: Python<'_>, directory: PathBuf, repair: bool) -> PyResult<Vec<(PathBuf, String)>> {
    py.allow_threads(|| guarded(|| latent_cache::with_threads(None, || store::verify(&directory, repair))?))
}

type Problems = Vec<(PathBuf, &'static str, String, &'static str)>;

/// ([(path, kind, reason, action)], orphans, removed orphans, shard count) of a check of `directory`.
#[pyfunction(name = "check")]
#[pyo3(signature = (directory, full=true, repair=false, remove_orphans=false))]
pub fn check_py(py: Python<'_>, directory: PathBuf, full: bool, repair: bool, remove_orphans: bool) -> PyResult<(Problems, Vec<PathBuf>, Vec<PathBuf>, usize)> {
    let options = CheckOptions { full, repair, remove_orphans };
    let report = py.allow_threads(|| guarded(|| latent_cache::with_threads(None, || store::check(&directory, options))?))?;
    let problems = report
        .problems
        .into_iter()
        .map(|p| {
            let kind = match p.fault {
                ShardFault::Corrupt(_) => "corrupt",
                ShardFault::Unreadable(_) => "unreadable",
                ShardFault::Foreign(_) => "foreign",
            };
            (p.path, kind, p.fault.reason().to_string(), p.action.name())
        })
        .collect();
    Ok((problems, report.orphans, report.removed_orphans, report.shards))
}
