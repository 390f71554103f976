//! Thin PyO3 layer over `latent_cache`: argument extraction, GIL release, error mapping.
use pyo3::prelude::*;

#[pymodule(gil_used = false)]
mod _latent_cache {
    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", latent_cache::VERSION)
    }
}
