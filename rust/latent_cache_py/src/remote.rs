//! S3 binding: a bucket opened from SimpleTuner's `aws_*` keys; its listing, whole-object reads and inventory scan
//! run without the GIL. Credentials go to the client and nowhere else (not in `repr`, not in errors).
use crate::errors::guarded;
use crate::inventory::PyInventory;
use latent_cache::inventory::{self, Options};
use latent_cache::remote::{Bucket, BucketConfig, Patience};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use std::time::Duration;

/// A bucket of an S3-compatible server.
#[pyclass(name = "S3Bucket", module = "lcm_plugin._latent_cache", frozen)]
pub struct PyS3Bucket {
    inner: Bucket,
    name: String,
    endpoint: String,
}

#[pymethods]
impl PyS3Bucket {
    #[new]
    #[pyo3(signature = (endpoint, bucket, access_key_id, secret_access_key, *, region="us-east-1".to_string(),
                        session_token=None, retries=5, backoff_s=0.2, timeout_s=60.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        endpoint: String,
        bucket: String,
        access_key_id: String,
        secret_access_key: String,
        region: String,
        session_token: Option<String>,
        retries: usize,
        backoff_s: f64,
        timeout_s: f64,
    ) -> PyResult<Self> {
        let config =
            BucketConfig { endpoint: endpoint.clone(), bucket: bucket.clone(), region, access_key_id, secret_access_key, session_token };
        let patience = Patience {
            retries,
            backoff: Duration::from_secs_f64(backoff_s.max(0.0)),
            timeout: Duration::from_secs_f64(timeout_s.max(0.001)),
        };
        let inner = guarded(|| Bucket::open(&config, patience))?;
        Ok(PyS3Bucket { inner, name: bucket, endpoint })
    }

    fn __repr__(&self) -> String {
        format!("S3Bucket({:?} at {:?})", self.name, self.endpoint)
    }

    /// (key, size) of every object whose key starts with `prefix`, in key order.
    fn list(&self, py: Python<'_>, prefix: &str) -> PyResult<Vec<(String, u64)>> {
        let objects = py.allow_threads(|| guarded(|| self.inner.list(prefix)))?;
        Ok(objects.into_iter().map(|o| (o.key, o.size)).collect())
    }

    /// The bytes of each object of `keys` (None where it could not be read) and (index, why) per failure.
    #[pyo3(signature = (keys, concurrency=32))]
    fn get_all<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
        concurrency: usize,
    ) -> PyResult<(Vec<Option<Bound<'py, PyBytes>>>, Vec<(usize, String)>)> {
        let results = py.allow_threads(|| self.inner.get_all(&keys, concurrency));
        let mut objects = Vec::with_capacity(results.len());
        let mut errors = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(bytes) => objects.push(Some(PyBytes::new(py, &bytes))),
                Err(why) => {
                    objects.push(None);
                    errors.push((i, why));
                }
            }
        }
        Ok((objects, errors))
    }

    /// Writes `data` as the object `key`; returns its ETag (None if the server gives none).
    fn put(&self, py: Python<'_>, key: &str, data: Vec<u8>) -> PyResult<Option<String>> {
        py.allow_threads(|| guarded(|| self.inner.put(key, data)))
    }

    /// (size, ETag) of the object `key`, or None when there is none.
    fn head(&self, py: Python<'_>, key: &str) -> PyResult<Option<(u64, Option<String>)>> {
        let object = py.allow_threads(|| guarded(|| self.inner.head(key)))?;
        Ok(object.map(|o| (o.size, o.e_tag)))
    }

    /// The inventory of the objects under `prefix` (inventory::scan_bucket): keys are object keys; objects whose
    /// stamps the memo at `memo` holds are not fetched again.
    #[pyo3(signature = (prefix, extensions, caption_extension=None, memo=None, other_extensions=Vec::new(), concurrency=32))]
    fn scan(
        &self,
        py: Python<'_>,
        prefix: &str,
        extensions: Vec<String>,
        caption_extension: Option<String>,
        memo: Option<PathBuf>,
        other_extensions: Vec<String>,
        concurrency: usize,
    ) -> PyResult<PyInventory> {
        let options = Options { extensions, other_extensions, caption_extension };
        let inner = py.allow_threads(|| {
            guarded(|| inventory::scan_bucket(&self.inner, prefix, &options, memo.as_deref(), concurrency))
        })?;
        Ok(PyInventory { inner: inner.into() })
    }
}
