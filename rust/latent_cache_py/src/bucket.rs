//! Bucketing binding: a SimpleTuner dataset config dict in, one dict per image out.
use crate::errors::{guarded, BucketConfigError, IntoPy};
use latent_cache::bucket::{AspectBuckets, BucketConfig, Bucketer, CropAspect, CropStyle, ResolutionType, Sample};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt};
use std::collections::HashMap;

/// Everything a sample dict holds, as a map key (the aspect ratio by its bits).
type SampleKey = (String, u64, [(i64, i64); 5]);

fn bad(key: &str, why: &str) -> PyErr {
    BucketConfigError::new_err(format!("invalid setting `{key}`: {why}"))
}

fn number(d: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<f64>> {
    match d.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) if v.is_instance_of::<pyo3::types::PyBool>() => Err(bad(key, "must be a number")),
        Some(v) if v.is_instance_of::<PyInt>() || v.is_instance_of::<PyFloat>() => Ok(Some(v.extract()?)),
        Some(v) => Err(bad(key, &format!("must be a number, got {}", v.repr()?))),
    }
}

fn choice<T: Copy>(d: &Bound<'_, PyDict>, key: &str, default: T, options: &[(&str, T)]) -> PyResult<T> {
    let Some(v) = d.get_item(key)?.filter(|v| !v.is_none()) else { return Ok(default) };
    let s: String = v.extract().map_err(|_| bad(key, "must be a string"))?;
    let names: Vec<&str> = options.iter().map(|o| o.0).collect();
    options
        .iter()
        .find(|o| o.0 == s)
        .map(|o| o.1)
        .ok_or_else(|| bad(key, &format!("`{s}` is not one of {}", names.join(", "))))
}

fn aspect_buckets(d: &Bound<'_, PyDict>) -> PyResult<AspectBuckets> {
    let key = "crop_aspect_buckets";
    let Some(v) = d.get_item(key)?.filter(|v| !v.is_none()) else { return Ok(AspectBuckets::Plain(Vec::new())) };
    let items: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| bad(key, "must be a list"))?;
    if items.first().is_some_and(|i| i.is_instance_of::<PyDict>()) {
        let pairs = items
            .iter()
            .map(|i| {
                let a = i.get_item("aspect").and_then(|x| x.extract::<f64>());
                let w = i.get_item("weight").and_then(|x| x.extract::<f64>());
                a.and_then(|a| w.map(|w| (a, w))).map_err(|_| bad(key, "dict entries need float `aspect` and `weight`"))
            })
            .collect::<PyResult<_>>()?;
        return Ok(AspectBuckets::Weighted(pairs));
    }
    // SimpleTuner only accepts floats here (an int list raises in `_select_random_aspect`).
    items
        .iter()
        .map(|i| if i.is_instance_of::<PyFloat>() { i.extract() } else { Err(bad(key, "must be a list of floats or of {aspect, weight} dicts")) })
        .collect::<PyResult<_>>()
        .map(AspectBuckets::Plain)
}

/// Reads a multidatabackend.json entry (plus `aspect_bucket_alignment` / `aspect_bucket_rounding`).
fn config_from_dict(d: &Bound<'_, PyDict>) -> PyResult<BucketConfig> {
    let resolution = number(d, "resolution")?.ok_or_else(|| bad("resolution", "is required"))?;
    let kind: String = d
        .get_item("resolution_type")?
        .ok_or_else(|| bad("resolution_type", "is required (pixel, area or pixel_area)"))?
        .extract()
        .map_err(|_| bad("resolution_type", "must be a string"))?;
    let resolution_type = match kind.as_str() {
        "pixel" | "pixel_area" => ResolutionType::Pixel,
        "area" => ResolutionType::Area,
        _ => return Err(bad("resolution_type", &format!("`{kind}` is not one of pixel, area, pixel_area"))),
    };
    if number(d, "max_upscale_threshold")?.is_some() {
        return Err(bad("max_upscale_threshold", "is not supported by the header-only bucketer"));
    }
    let mut c = BucketConfig::new(resolution, resolution_type);
    c.alignment = number(d, "aspect_bucket_alignment")?.map_or(64, |v| v as i64);
    c.rounding = number(d, "aspect_bucket_rounding")?.map_or(2, |v| v as i32);
    c.crop = match d.get_item("crop")? {
        Some(v) if !v.is_none() => v.extract().map_err(|_| bad("crop", "must be true or false"))?,
        _ => false,
    };
    c.crop_aspect = choice(
        d,
        "crop_aspect",
        CropAspect::Square,
        &[("square", CropAspect::Square), ("preserve", CropAspect::Preserve), ("closest", CropAspect::Closest), ("random", CropAspect::Random)],
    )?;
    c.crop_style = choice(
        d,
        "crop_style",
        CropStyle::Random,
        &[("center", CropStyle::Center), ("centre", CropStyle::Center), ("corner", CropStyle::Corner), ("random", CropStyle::Random)],
    )?;
    c.crop_aspect_buckets = aspect_buckets(d)?;
    c.minimum_image_size = number(d, "minimum_image_size")?;
    c.maximum_image_size = number(d, "maximum_image_size")?;
    c.target_downsample_size = number(d, "target_downsample_size")?;
    if kind == "pixel_area" {
        if resolution.fract() != 0.0 {
            return Err(bad("resolution", "must be a whole number of pixels for resolution_type `pixel_area`"));
        }
        c = c.from_pixel_area();
    }
    Ok(c)
}

pub(crate) fn sample_dict<'py>(py: Python<'py>, s: &Sample) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bucket", &s.bucket)?;
    d.set_item("aspect_ratio", s.aspect_ratio)?;
    d.set_item("original_size", s.original_size)?;
    d.set_item("intermediary_size", s.intermediary_size)?;
    d.set_item("target_size", s.target_size)?;
    d.set_item("crop_coordinates", s.crop_coordinates)?;
    d.set_item("resize_size", s.resize_size)?;
    Ok(d)
}

/// SimpleTuner-identical bucketer for one dataset; feed images in discovery order.
#[pyclass(name = "Bucketer", module = "lcm_plugin._latent_cache")]
pub struct PyBucketer {
    pub(crate) inner: Bucketer,
}

#[pymethods]
impl PyBucketer {
    #[new]
    #[pyo3(signature = (config, seed=0))]
    fn new(config: &Bound<'_, PyDict>, seed: u64) -> PyResult<Self> {
        Ok(PyBucketer { inner: Bucketer::new(config_from_dict(config)?, seed).py()? })
    }

    /// One dict (or `None` for an image below `minimum_image_size`) per (W, H). Equal answers are one dict, to be
    /// read, not changed: a dataset of a few sizes holds a few dicts, not one per image (random crops differ).
    fn assign<'py>(&mut self, py: Python<'py>, sizes: Vec<(i64, i64)>) -> PyResult<Vec<Option<Bound<'py, PyDict>>>> {
        let inner = &mut self.inner;
        let samples = py.allow_threads(|| guarded(|| sizes.iter().map(|&(w, h)| inner.assign(w, h)).collect::<latent_cache::Result<Vec<_>>>()))?;
        let mut made: HashMap<SampleKey, Bound<'py, PyDict>> = HashMap::new();
        samples
            .iter()
            .map(|sample| {
                let Some(s) = sample else { return Ok(None) };
                let key = (s.bucket.clone(), s.aspect_ratio.to_bits(), [s.original_size, s.intermediary_size, s.target_size, s.crop_coordinates, s.resize_size]);
                if let Some(dict) = made.get(&key) {
                    return Ok(Some(dict.clone()));
                }
                let dict = sample_dict(py, s)?;
                made.insert(key, dict.clone());
                Ok(Some(dict))
            })
            .collect()
    }

    /// SimpleTuner's area-mode memo as (resolution, aspect key, (W, H)).
    #[getter]
    fn resolution_map(&self) -> Vec<(f64, String, (i64, i64))> {
        self.inner.resolution_map()
    }

    /// Seeds the memo, e.g. from an earlier run's `resolution_map`.
    fn remember(&mut self, resolution: f64, aspect_key: String, size: (i64, i64)) {
        self.inner.remember_resolution(resolution, aspect_key, size);
    }
}
