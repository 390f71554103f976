//! Header scan bindings.
use crate::errors::guarded;
use pyo3::prelude::*;
use std::path::PathBuf;

type Sizes = Vec<Option<(u32, u32)>>;
type Errors = Vec<(usize, String)>;

/// Oriented (W, H) of every path, in parallel without the GIL; per-file failures as (index, message).
#[pyfunction(name = "scan_sizes")]
#[pyo3(signature = (paths, threads=None))]
pub fn scan_sizes_py(py: Python<'_>, paths: Vec<PathBuf>, threads: Option<usize>) -> PyResult<(Sizes, Errors)> {
    let results = py.allow_threads(|| guarded(|| latent_cache::with_threads(threads, || latent_cache::scan::scan_sizes(&paths))))?;
    let mut sizes = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(s) => sizes.push(Some(s)),
            Err(e) => {
                sizes.push(None);
                errors.push((i, e.to_string()));
            }
        }
    }
    Ok((sizes, errors))
}

/// (width, height, orientation, format) of one file as stored; raises on failure.
#[pyfunction(name = "read_header")]
pub fn read_header_py(py: Python<'_>, path: PathBuf) -> PyResult<(u32, u32, u16, &'static str)> {
    let h = py.allow_threads(|| guarded(|| latent_cache::scan::read_header(&path)))?;
    let format = match h.format {
        latent_cache::scan::Format::Jpeg => "jpeg",
        latent_cache::scan::Format::Png => "png",
        latent_cache::scan::Format::Webp => "webp",
        latent_cache::scan::Format::Other => "other",
    };
    Ok((h.width, h.height, h.orientation, format))
}
