//! Plan binding: a dataset's planned images as one object whose columns stay in Rust. Python asks for rows only
//! where it works on them (what changed, what failed); serving the trainer and SimpleTuner's bucket files are
//! answered from the columns.
use crate::bucket::{sample_dict, PyBucketer};
use crate::cache::PyCacheReader;
use crate::errors::guarded;
use crate::inventory::PyInventory;
use latent_cache::inventory::Inventory;
use latent_cache::memo::CaptionRef;
use latent_cache::plan::{self, hex, KeyIndex, LeftOut, Plan, Rules};
use numpy::{PyArray1, IntoPyArray};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use std::sync::{Arc, OnceLock};

/// (absolute path, key, caption file text, content hash, store key, sample index) of one planned image.
type Row<'a> = (String, &'a str, Option<&'a str>, String, String, u32);

/// The planned images of one dataset (`plan.rs`), with their store keys once `name` was called.
#[pyclass(name = "ImageTable", module = "lcm_plugin._latent_cache", frozen)]
pub struct PyImageTable {
    inventory: Arc<Inventory>,
    plan: Arc<Plan>,
    /// The data folder, absolute, ending in '/' (empty where keys are the images' names: an S3 bucket's objects):
    /// an image's path is this plus its key.
    folder: String,
    recipes: OnceLock<Arc<Vec<[u8; 8]>>>,
}

impl PyImageTable {
    fn recipes(&self) -> PyResult<&Arc<Vec<[u8; 8]>>> {
        self.recipes.get().ok_or_else(|| PyValueError::new_err("the table has no store keys yet: call name() first"))
    }

    fn position(&self, p: usize) -> PyResult<usize> {
        if p < self.plan.len() { Ok(p) } else { Err(PyValueError::new_err(format!("position {p} is not planned"))) }
    }
}

fn left_out_name(why: LeftOut) -> &'static str {
    match why {
        LeftOut::NoSize => "no_size",
        LeftOut::TooSmall => "too_small",
        LeftOut::AspectBelowMinimum => "aspect_below_minimum",
        LeftOut::AspectAboveMaximum => "aspect_above_maximum",
        LeftOut::CaptionUnreadable => "caption_unreadable",
        LeftOut::CaptionMissing => "caption_missing",
        LeftOut::Refused => "refused",
    }
}

#[pymethods]
impl PyImageTable {
    /// Plans the images of `inventory` (a scan of `folder`) with `bucketer`, which sees them in row order. `sizes`:
    /// (W, H) per inventory row from a table instead of the headers (None in a row: no size); `refused`: rows the
    /// caller leaves out after the bucketing filters.
    #[new]
    #[pyo3(signature = (inventory, folder, bucketer, *, sizes=None, caption_file_required=false, refused=Vec::new(),
                        minimum_aspect_ratio=None, maximum_aspect_ratio=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        inventory: PyRef<'_, PyInventory>,
        folder: String,
        mut bucketer: PyRefMut<'_, PyBucketer>,
        sizes: Option<Vec<Option<(u32, u32)>>>,
        caption_file_required: bool,
        mut refused: Vec<u32>,
        minimum_aspect_ratio: Option<f64>,
        maximum_aspect_ratio: Option<f64>,
    ) -> PyResult<Self> {
        let inventory = inventory.inner.clone();
        if sizes.as_ref().is_some_and(|s| s.len() != inventory.len()) {
            return Err(PyValueError::new_err("sizes must give one entry per inventory row"));
        }
        refused.sort_unstable();
        let folder = if folder.is_empty() || folder.ends_with('/') { folder } else { format!("{folder}/") };
        let bucketer = &mut bucketer.inner;
        let planned = py.allow_threads(|| {
            let rules = Rules {
                sizes: sizes.as_deref(),
                caption_file_required,
                refused: &refused,
                minimum_aspect_ratio,
                maximum_aspect_ratio,
            };
            guarded(|| plan::plan(&inventory, bucketer, &rules))
        })?;
        Ok(PyImageTable { inventory, plan: Arc::new(planned), folder, recipes: OnceLock::new() })
    }

    fn __len__(&self) -> usize {
        self.plan.len()
    }

    /// (inventory row, why) of every image read but not planned: no_size, too_small, aspect_below_minimum,
    /// aspect_above_maximum, caption_unreadable, caption_missing or refused.
    #[getter]
    fn left_out(&self) -> Vec<(u32, &'static str)> {
        self.plan.left_out.iter().map(|&(row, why)| (row, left_out_name(why))).collect()
    }

    /// Names every image's latent in the store: `<key>@<recipe digest>` under the latent fingerprint digest
    /// `fingerprint`. Once per table.
    fn name(&self, py: Python<'_>, fingerprint: &str) -> PyResult<()> {
        let recipes = py.allow_threads(|| latent_cache::with_threads(None, || self.plan.recipes(&self.inventory, fingerprint)));
        let recipes = guarded(|| recipes)?;
        self.recipes.set(Arc::new(recipes)).map_err(|_| PyValueError::new_err("the table was named already"))
    }

    /// 64 hex digits over every image's store key and caption source: equal on two tables that encode the same.
    fn digest(&self) -> PyResult<String> {
        Ok(hex(&self.plan.digest(&self.inventory, self.recipes()?)))
    }

    /// The rows at `positions`: (absolute path, key, caption file text or None, content hash, store key ("" before
    /// `name`), sample index).
    fn rows(&self, positions: Vec<usize>) -> PyResult<Vec<Row<'_>>> {
        let recipes = self.recipes.get();
        positions
            .into_iter()
            .map(|p| {
                let p = self.position(p)?;
                let row = self.plan.rows[p] as usize;
                let text = if let CaptionRef::Text(_, t) = self.inventory.caption(row) { Some(t) } else { None };
                let key = recipes.map(|r| self.plan.store_key(&self.inventory, r, p)).unwrap_or_default();
                let image = self.inventory.key(row);
                Ok((format!("{}{image}", self.folder), image, text, format!("{:032x}", self.inventory.content(row)), key, self.plan.sample_of[p]))
            })
            .collect()
    }

    /// The bucketer's answer number `index` as a dict (bucket, aspect_ratio, original_size, intermediary_size,
    /// target_size, crop_coordinates, resize_size).
    fn sample<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyDict>> {
        let sample = self.plan.samples.get(index).ok_or_else(|| PyValueError::new_err(format!("no sample {index}")))?;
        sample_dict(py, sample)
    }

    /// The position of each of `paths` (absolute, as the table names them), None where it is not planned.
    fn positions_of(&self, paths: Vec<String>) -> Vec<Option<usize>> {
        paths.iter().map(|path| path.strip_prefix(&self.folder).and_then(|key| self.plan.position_of(&self.inventory, key))).collect()
    }

    /// The VAE batches: (bucket, positions) per batch of at most `size`, buckets in order of first appearance.
    fn batches<'py>(&self, py: Python<'py>, size: usize) -> Vec<(String, Bound<'py, PyArray1<u32>>)> {
        self.plan.batches(size).into_iter().map(|(bucket, positions)| (bucket.to_string(), positions.into_pyarray(py))).collect()
    }

    /// SimpleTuner's bucket files of every planned image but those at `excluded` positions: (bucket indices JSON,
    /// metadata JSON) as `json.dumps` writes them, and the metadata as `json.loads` would read it back (equal
    /// answers share their size lists: SimpleTuner reads them, never changes them).
    fn bucket_files<'py>(&self, py: Python<'py>, excluded: Vec<usize>) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, Bound<'py, PyDict>)> {
        let mut keep = vec![true; self.plan.len()];
        for p in excluded {
            keep[self.position(p)?] = false;
        }
        let positions: Vec<u32> = (0..self.plan.len() as u32).filter(|&p| keep[p as usize]).collect();
        let (indices, metadata) = py.allow_threads(|| self.plan.bucket_files(&self.inventory, &self.folder, &positions));
        let templates: Vec<Bound<'py, PyDict>> = self.plan.samples.iter().map(|s| {
            let d = PyDict::new(py);
            d.set_item("original_size", PyList::new(py, [s.original_size.0, s.original_size.1])?)?;
            d.set_item("crop_coordinates", PyList::new(py, [s.crop_coordinates.0, s.crop_coordinates.1])?)?;
            d.set_item("target_size", PyList::new(py, [s.target_size.0, s.target_size.1])?)?;
            d.set_item("intermediary_size", PyList::new(py, [s.intermediary_size.0, s.intermediary_size.1])?)?;
            d.set_item("aspect_ratio", s.aspect_ratio)?;
            Ok(d)
        }).collect::<PyResult<_>>()?;
        let loaded = PyDict::new(py);
        for &p in &positions {
            let key = self.inventory.key(self.plan.rows[p as usize] as usize);
            let path = PyString::new(py, &format!("{}{key}", self.folder));
            loaded.set_item(path, templates[self.plan.sample_of[p as usize] as usize].copy()?)?;
        }
        Ok((PyBytes::new(py, indices.as_bytes()), PyBytes::new(py, metadata.as_bytes()), loaded))
    }

    /// Whether `reader` holds `<store key><suffix>` of each planned image, by position.
    fn held<'py>(&self, py: Python<'py>, reader: PyRef<'_, PyCacheReader>, suffix: &str) -> PyResult<Bound<'py, PyArray1<bool>>> {
        let recipes = self.recipes()?.clone();
        let store = reader.inner.clone();
        let held = py.allow_threads(|| guarded(|| latent_cache::with_threads(None, || self.plan.held_by(&self.inventory, &recipes, &store, suffix))))?;
        Ok(held.into_pyarray(py))
    }

    /// What the trainer reads from `reader`: every planned image but those at `failed` positions whose latent the
    /// store holds.
    fn serve(&self, py: Python<'_>, reader: PyRef<'_, PyCacheReader>, failed: Vec<usize>) -> PyResult<PyServedImages> {
        let recipes = self.recipes()?.clone();
        let store = reader.inner.clone();
        let mut served = py.allow_threads(|| guarded(|| latent_cache::with_threads(None, || self.plan.held_by(&self.inventory, &recipes, &store, ""))))?;
        for p in failed {
            served[self.position(p)?] = false;
        }
        let count = served.iter().filter(|&&s| s).count();
        let index = py.allow_threads(|| KeyIndex::new(&self.plan, &self.inventory));
        Ok(PyServedImages { inventory: self.inventory.clone(), plan: self.plan.clone(), recipes, folder: self.folder.clone(), served, count, index })
    }
}

/// The images of a dataset the trainer reads from the store: a read-only mapping of their absolute paths to their
/// store keys (`in`, `len`, iteration over the paths, `get`).
#[pyclass(name = "ServedImages", module = "lcm_plugin._latent_cache", frozen)]
pub struct PyServedImages {
    inventory: Arc<Inventory>,
    plan: Arc<Plan>,
    recipes: Arc<Vec<[u8; 8]>>,
    folder: String,
    served: Vec<bool>,
    count: usize,
    index: KeyIndex,
}

impl PyServedImages {
    /// The inventory key of `path`: a str under the folder.
    fn key_of<'a>(&self, path: &'a Bound<'_, PyAny>) -> Option<&'a str> {
        path.downcast::<PyString>().ok()?.to_str().ok()?.strip_prefix(&self.folder)
    }

    fn served_position(&self, path: &Bound<'_, PyAny>) -> Option<usize> {
        let p = self.index.position_of(&self.plan, &self.inventory, self.key_of(path)?)?;
        self.served[p].then_some(p)
    }
}

#[pymethods]
impl PyServedImages {
    fn __len__(&self) -> usize {
        self.count
    }

    fn __contains__(&self, path: &Bound<'_, PyAny>) -> bool {
        self.served_position(path).is_some()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let paths: Vec<String> = (0..self.plan.len())
            .filter(|&p| self.served[p])
            .map(|p| format!("{}{}", self.folder, self.inventory.key(self.plan.rows[p] as usize)))
            .collect();
        Ok(PyList::new(py, paths)?.into_any().try_iter()?.into_any())
    }

    /// Those of `paths` (any iterable) that are not served, in their order: one pass over SimpleTuner's lists of a
    /// million paths, the lookups in parallel without the GIL.
    fn missing_from<'py>(&self, py: Python<'py>, paths: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let paths: Vec<Bound<'py, PyAny>> = paths.try_iter()?.collect::<PyResult<_>>()?;
        let keys: Vec<Option<&str>> = paths.iter().map(|path| self.key_of(path)).collect();
        let positions = py.allow_threads(|| latent_cache::with_threads(None, || self.index.positions_of(&self.plan, &self.inventory, &keys)));
        let positions = guarded(|| positions)?;
        let served = positions.into_iter().map(|p| p.is_some_and(|p| self.served[p]));
        Ok(paths.into_iter().zip(served).filter(|(_, served)| !served).map(|(path, _)| path).collect())
    }

    /// The store key of the latent of `path` (absolute, as the scan names it), None when it is not served.
    fn get(&self, path: &Bound<'_, PyAny>) -> Option<String> {
        self.served_position(path).map(|p| self.plan.store_key(&self.inventory, &self.recipes, p))
    }
}
