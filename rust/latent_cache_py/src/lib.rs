//! Thin PyO3 layer over `latent_cache`: argument extraction, GIL release, error mapping.
use pyo3::prelude::*;

mod bucket;
mod cache;
mod decode;
mod errors;
mod inventory;
mod plan;
mod remote;
mod scan;

#[pymodule(gil_used = false)]
mod _latent_cache {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::scan::{read_header_py, scan_sizes_py};
    #[pymodule_export]
    use crate::inventory::{inventory_of_memo_py, scan_blobs_py, scan_inventory_py, PyInventory};
    #[pymodule_export]
    use crate::bucket::PyBucketer;
    #[pymodule_export]
    use crate::plan::{PyImageTable, PyServedImages};
    #[pymodule_export]
    use crate::remote::PyS3Bucket;
    #[pymodule_export]
    use crate::decode::{decode_batch_bytes_py, decode_batch_py};
    #[pymodule_export]
    use crate::cache::{check_py, verify_py, PyCacheReader, PyCacheWriter};

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        crate::errors::register(m)?;
        m.add("FORMAT_VERSION", latent_cache::store::FORMAT_VERSION)?;
        m.add("DEFAULT_MAX_PIXELS", latent_cache::decode::DEFAULT_MAX_PIXELS)?;
        m.add("__version__", latent_cache::VERSION)
    }
}
