//! Batch decode binding: pixels come back as one `uint8 [N, H, W, 3]` array.
use latent_cache::decode::{decode_batch, Batch, Geometry, Source, DEFAULT_MAX_PIXELS};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use std::path::{Path, PathBuf};

use crate::errors::{guarded, BucketConfigError};

type Out<'py> = (Bound<'py, PyAny>, Vec<usize>, Vec<(usize, String)>);

fn geometry(n: usize, resize_sizes: &[(u32, u32)], crops: &[(u32, u32)]) -> PyResult<Vec<Geometry>> {
    if resize_sizes.len() != n || crops.len() != n {
        return Err(BucketConfigError::new_err(format!(
            "invalid setting `resize_sizes`/`crops`: need one per image ({n}), got {} and {}",
            resize_sizes.len(),
            crops.len()
        )));
    }
    Ok(resize_sizes.iter().zip(crops).map(|(&resize, &crop)| Geometry { resize, crop }).collect())
}

fn to_python<'py>(py: Python<'py>, batch: Batch, target: (u32, u32)) -> PyResult<Out<'py>> {
    let n = batch.ok.len();
    let array = PyArray1::from_vec(py, batch.pixels).reshape([n, target.1 as usize, target.0 as usize, 3])?;
    let errors = batch.errors.into_iter().map(|(i, e)| (i, e.to_string())).collect();
    Ok((array.into_any(), batch.ok, errors))
}

/// Decodes, orients, resizes (`resize_sizes[i]` as (W, H)) and crops (`crops[i]` as (top, left)) every file to
/// `target_size` (W, H), in parallel without the GIL.
#[pyfunction(name = "decode_batch")]
#[pyo3(signature = (paths, resize_sizes, crops, target_size, threads=None, max_pixels=DEFAULT_MAX_PIXELS))]
pub fn decode_batch_py<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    resize_sizes: Vec<(u32, u32)>,
    crops: Vec<(u32, u32)>,
    target_size: (u32, u32),
    threads: Option<usize>,
    max_pixels: u64,
) -> PyResult<Out<'py>> {
    let geo = geometry(paths.len(), &resize_sizes, &crops)?;
    let batch = py
        .allow_threads(|| guarded(|| {
            let sources: Vec<Source<'_>> = paths.iter().map(|p| Source::Path(p)).collect();
            latent_cache::with_threads(threads, || decode_batch(&sources, &geo, target_size, max_pixels))
        }))?;
    to_python(py, batch, target_size)
}

/// `decode_batch` over encoded images held in memory (`names` only label errors); with `oriented=False` their EXIF
/// orientation is not applied (as SimpleTuner decodes S3 objects).
#[pyfunction(name = "decode_batch_bytes")]
#[pyo3(signature = (blobs, resize_sizes, crops, target_size, names=None, threads=None, max_pixels=DEFAULT_MAX_PIXELS, oriented=true))]
#[allow(clippy::too_many_arguments)]
pub fn decode_batch_bytes_py<'py>(
    py: Python<'py>,
    blobs: Vec<PyBackedBytes>,
    resize_sizes: Vec<(u32, u32)>,
    crops: Vec<(u32, u32)>,
    target_size: (u32, u32),
    names: Option<Vec<PathBuf>>,
    threads: Option<usize>,
    max_pixels: u64,
    oriented: bool,
) -> PyResult<Out<'py>> {
    let geo = geometry(blobs.len(), &resize_sizes, &crops)?;
    let names = names.unwrap_or_else(|| (0..blobs.len()).map(|i| PathBuf::from(format!("<bytes {i}>"))).collect());
    if names.len() != blobs.len() {
        return Err(BucketConfigError::new_err("invalid setting `names`: need one per image"));
    }
    let batch = py
        .allow_threads(|| guarded(|| {
            let sources: Vec<Source<'_>> = names
                .iter()
                .zip(&blobs)
                .map(|(n, b)| if oriented { Source::Bytes(Path::new(n), b) } else { Source::StoredBytes(Path::new(n), b) })
                .collect();
            latent_cache::with_threads(threads, || decode_batch(&sources, &geo, target_size, max_pixels))
        }))?;
    to_python(py, batch, target_size)
}
