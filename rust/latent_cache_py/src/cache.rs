//! Latent cache bindings: writer, mmap reader with zero-copy shard arrays, verify.
use crate::errors::IntoPy;
use latent_cache::store::{self, CacheReader, CacheWriter, Dtype};
use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// Writes tensors (given as raw bytes + safetensors dtype + shape) into sealed shards.
#[pyclass(name = "CacheWriter", module = "lcm_plugin._latent_cache")]
pub struct PyCacheWriter {
    inner: CacheWriter,
}

#[pymethods]
impl PyCacheWriter {
    #[new]
    #[pyo3(signature = (directory, writer="rank0", shard_bytes=256 << 20))]
    fn new(py: Python<'_>, directory: PathBuf, writer: &str, shard_bytes: usize) -> PyResult<Self> {
        Ok(PyCacheWriter { inner: py.allow_threads(|| CacheWriter::open(&directory, writer, shard_bytes)).py()? })
    }

    /// Queues `data` (a C-contiguous uint8 view of the tensor) under `key`; may seal a shard.
    fn put(&mut self, py: Python<'_>, key: &str, dtype: &str, shape: Vec<usize>, data: PyReadonlyArrayDyn<'_, u8>) -> PyResult<()> {
        let dtype = Dtype::parse(dtype).py()?;
        let bytes = data.as_slice().map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?.to_vec();
        let inner = &mut self.inner;
        py.allow_threads(|| inner.put(key, dtype, shape, bytes)).py()
    }

    /// Seals pending tensors into a shard (temp file, fsync, rename) and commits the index.
    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.allow_threads(|| inner.commit()).py()
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
    inner: Arc<CacheReader>,
}

#[pymethods]
impl PyCacheReader {
    #[new]
    #[pyo3(signature = (directory, verify=true))]
    fn new(py: Python<'_>, directory: PathBuf, verify: bool) -> PyResult<Self> {
        Ok(PyCacheReader { inner: Arc::new(py.allow_threads(|| CacheReader::open(&directory, verify)).py()?) })
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

    /// (shard, byte offset, byte length, dtype, shape) of `key`; verifies its shard on first use.
    fn locate(&self, py: Python<'_>, key: &str) -> PyResult<(usize, usize, usize, &'static str, Vec<usize>)> {
        let inner = &self.inner;
        let e = py.allow_threads(|| inner.locate(key).cloned()).py()?;
        Ok((e.shard, e.offset, e.len, e.dtype.name(), e.shape))
    }

    /// The whole shard as a read-only, zero-copy `uint8` array over the memory map.
    fn shard_array<'py>(slf: &Bound<'py, Self>, shard: usize) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let py = slf.py();
        let reader = &slf.get().inner;
        if shard >= reader.shard_count() {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("shard {shard} out of range")));
        }
        let data = py.allow_threads(|| reader.shard_data(shard).map(|d| (d.as_ptr() as usize, d.len()))).py()?;
        // SAFETY: the bytes live in an Mmap owned by `reader`'s Arc, which `slf` (the array's base object)
        // keeps alive for the array's lifetime; the map is read-only and the array is marked non-writeable below.
        let array = unsafe {
            let view = ArrayView1::from_shape_ptr(data.1, data.0 as *const u8);
            PyArray1::borrow_from_array(&view, slf.clone().into_any())
        };
        array.call_method("setflags", (), Some(&[("write", false)].into_py_dict(py)?))?;
        Ok(array)
    }

    /// Copies the tensors of `keys` (all the same byte size) into `out` (a writable C-contiguous `uint8` array of
    /// exactly N × nbytes bytes, e.g. a reused batch buffer) or, without it, into a new `uint8 [N, nbytes]` array;
    /// in parallel without the GIL. Returns the array written.
    #[pyo3(signature = (keys, out=None))]
    fn gather<'py>(&self, py: Python<'py>, keys: Vec<String>, out: Option<Bound<'py, PyArrayDyn<u8>>>) -> PyResult<Bound<'py, PyAny>> {
        let inner = &self.inner;
        let len = match keys.first() {
            Some(k) => py.allow_threads(|| inner.locate(k).map(|e| e.len)).py()?,
            None => 0,
        };
        let out = match out {
            Some(array) => {
                if array.len() != len * keys.len() {
                    return Err(PyValueError::new_err(format!(
                        "gather: `out` has {} bytes, {} keys of {len} bytes need {}",
                        array.len(),
                        keys.len(),
                        len * keys.len()
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
            py.allow_threads(|| inner.gather(&keys, bytes)).py()?;
        }
        Ok(out)
    }
}

use pyo3::types::IntoPyDict;

/// Checks every shard of `directory`; returns (shard path, reason) per failure. `repair` deletes failed
/// shards and drops them from their index so a rebuild re-encodes their keys.
#[pyfunction(name = "verify")]
#[pyo3(signature = (directory, repair=false))]
pub fn verify_py(py: Python<'_>, directory: PathBuf, repair: bool) -> PyResult<Vec<(PathBuf, String)>> {
    py.allow_threads(|| latent_cache::with_threads(None, || store::verify(&directory, repair))).py()?.py()
}
