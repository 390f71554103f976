//! Aspect bucketing, reproducing SimpleTuner 4.10.1's header-only discovery for one image dataset:
//! `TrainingSample(image=None, image_metadata={"original_size": (W, H)}).prepare()` plus
//! `MetadataBackend.meets_resolution_requirements`. Each function names the SimpleTuner function it mirrors;
//! Python's float/int semantics (banker's rounding, `int()` truncation, `round(x, n)`) are kept on purpose.
use crate::error::{CacheError, Result};
use crate::pyrandom::PyRandom;
use std::collections::HashMap;

/// `resolution_type` after SimpleTuner's `pixel_area` → `area` conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolutionType {
    /// `resolution` is the shorter edge in pixels.
    Pixel,
    /// `resolution` is an area in megapixels.
    Area,
}

/// `crop_aspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropAspect {
    /// Square crops at the pixel resolution.
    Square,
    /// Keep the image's own (rounded) aspect.
    Preserve,
    /// The `crop_aspect_buckets` entry closest to the image's aspect.
    Closest,
    /// A random `crop_aspect_buckets` entry (weighted when weights are given).
    Random,
}

/// `crop_style` (`face` needs pixels and is not supported by a header-only path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropStyle {
    /// Centred crop.
    Center,
    /// Top-left crop.
    Corner,
    /// Uniform random offsets (Python `random.randint`).
    Random,
}

/// `crop_aspect_buckets`: plain aspects, or `{"aspect", "weight"}` entries.
#[derive(Debug, Clone, PartialEq)]
pub enum AspectBuckets {
    /// A list of floats.
    Plain(Vec<f64>),
    /// `(aspect, weight)` pairs; weights must sum to exactly 1.0 (as SimpleTuner requires).
    Weighted(Vec<(f64, f64)>),
}

/// One dataset's bucketing settings, named as in multidatabackend.json / config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketConfig {
    /// `resolution` (pixels for pixel, megapixels for area).
    pub resolution: f64,
    /// `resolution_type`.
    pub resolution_type: ResolutionType,
    /// `aspect_bucket_alignment` (global arg, default 64).
    pub alignment: i64,
    /// `aspect_bucket_rounding` (global arg, default 2).
    pub rounding: i32,
    /// `crop`.
    pub crop: bool,
    /// `crop_aspect`.
    pub crop_aspect: CropAspect,
    /// `crop_aspect_buckets`.
    pub crop_aspect_buckets: AspectBuckets,
    /// `crop_style`.
    pub crop_style: CropStyle,
    /// `minimum_image_size` (same unit as `resolution`).
    pub minimum_image_size: Option<f64>,
    /// `maximum_image_size` (only enables the downsample-before-crop step, as in SimpleTuner).
    pub maximum_image_size: Option<f64>,
    /// `target_downsample_size` (same unit as `resolution`).
    pub target_downsample_size: Option<f64>,
}

impl BucketConfig {
    /// Defaults of an image dataset: pixel 1024, alignment 64, rounding 2, no crop, square, random style.
    pub fn new(resolution: f64, resolution_type: ResolutionType) -> Self {
        BucketConfig {
            resolution,
            resolution_type,
            alignment: 64,
            rounding: 2,
            crop: false,
            crop_aspect: CropAspect::Square,
            crop_aspect_buckets: AspectBuckets::Plain(Vec::new()),
            crop_style: CropStyle::Random,
            minimum_image_size: None,
            maximum_image_size: None,
            target_downsample_size: None,
        }
    }

    /// SimpleTuner's `pixel_area` conversion (`FactoryRegistry._handle_resolution_conversion`): edge² / 1e6 for
    /// the resolution and for each positive size setting, then `area`.
    pub fn from_pixel_area(mut self) -> Self {
        let sq = |v: f64| v * v / 1_000_000.0;
        self.resolution = sq(self.resolution);
        self.resolution_type = ResolutionType::Area;
        for v in [&mut self.maximum_image_size, &mut self.target_downsample_size, &mut self.minimum_image_size] {
            if let Some(x) = v.filter(|x| *x > 0.0) {
                *v = Some(sq(x));
            }
        }
        self
    }

    /// Checks the combinations SimpleTuner would reject during a run.
    pub fn validate(&self) -> Result<()> {
        if self.resolution.is_nan() || self.resolution <= 0.0 {
            return Err(CacheError::config("resolution", "must be a positive number"));
        }
        if self.resolution_type == ResolutionType::Pixel && self.resolution.fract() != 0.0 {
            return Err(CacheError::config("resolution", "must be a whole number of pixels for resolution_type `pixel`"));
        }
        if self.alignment < 1 {
            return Err(CacheError::config("aspect_bucket_alignment", "must be a positive integer"));
        }
        if !(0..=15).contains(&self.rounding) {
            return Err(CacheError::config("aspect_bucket_rounding", "must be an integer in 0..=15"));
        }
        if self.resolution_type == ResolutionType::Area && self.minimum_image_size.is_some_and(|m| m > 5.0) {
            return Err(CacheError::config(
                "minimum_image_size",
                "is in megapixels for resolution_type `area`; use a value below 5",
            ));
        }
        if let (ResolutionType::Pixel, Some(t)) = (self.resolution_type, self.target_downsample_size) {
            if t.fract() != 0.0 {
                return Err(CacheError::config("target_downsample_size", "must be a whole number of pixels"));
            }
        }
        let needs_buckets = self.crop && matches!(self.crop_aspect, CropAspect::Closest | CropAspect::Random);
        let empty = match &self.crop_aspect_buckets {
            AspectBuckets::Plain(v) => v.is_empty(),
            AspectBuckets::Weighted(v) => v.is_empty(),
        };
        if needs_buckets && empty {
            return Err(CacheError::config("crop_aspect_buckets", "must list aspects for crop_aspect `closest` or `random`"));
        }
        if let AspectBuckets::Weighted(v) = &self.crop_aspect_buckets {
            if self.crop_aspect == CropAspect::Random && v.iter().map(|b| b.1).sum::<f64>() != 1.0 {
                return Err(CacheError::config("crop_aspect_buckets", "weights must add up to 1"));
            }
        }
        Ok(())
    }

    /// `TrainingSample._set_resolution`: (target_area, pixel_resolution).
    fn target_area_and_pixel_resolution(&self) -> (f64, i64) {
        match self.resolution_type {
            ResolutionType::Pixel => (self.resolution, self.resolution as i64),
            ResolutionType::Area => {
                const COMMON: [(f64, f64); 5] =
                    [(0.25, 262_144.0), (0.5, 589_824.0), (1.0, 1_048_576.0), (2.0, 2_359_296.0), (4.0, 4_194_304.0)];
                let area = COMMON
                    .iter()
                    .find(|(mp, _)| (self.resolution - mp).abs() < 0.05)
                    .map_or(self.resolution * 1e6, |(_, px)| *px);
                (area, round_to_multiple(area.sqrt(), self.alignment))
            }
        }
    }
}

/// Where one image lands.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// SimpleTuner's bucket key: `str(aspect_ratio)`.
    pub bucket: String,
    /// Rounded aspect ratio of the bucket.
    pub aspect_ratio: f64,
    /// (W, H) after EXIF orientation.
    pub original_size: (i64, i64),
    /// (W, H) SimpleTuner records as `intermediary_size`.
    pub intermediary_size: (i64, i64),
    /// (W, H) of the training crop.
    pub target_size: (i64, i64),
    /// (top, left) of the crop in the resized image (SDXL `crop_coords_top_left`).
    pub crop_coordinates: (i64, i64),
    /// (W, H) the pixels are resized to before cropping (differs from `intermediary_size` only with
    /// `target_downsample_size`).
    pub resize_size: (i64, i64),
}

/// Stateful bucketer: SimpleTuner's area-mode aspect→resolution memo and the Python RNG live across images,
/// so images must be fed in discovery order.
pub struct Bucketer {
    // Shared so the per-image methods can read it while `self` (the rng, the memo) is borrowed mutably.
    config: std::sync::Arc<BucketConfig>,
    rng: PyRandom,
    /// `StateTracker.aspect_resolution_map`: resolution (f64 bits) → str(aspect) → (W, H).
    resolution_map: HashMap<u64, HashMap<String, (i64, i64)>>,
}

impl Bucketer {
    /// Validates `config`; `seed` plays the role of `random.seed(seed)` before discovery.
    pub fn new(config: BucketConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Bucketer { config: std::sync::Arc::new(config), rng: PyRandom::new(seed), resolution_map: HashMap::new() })
    }

    /// The area-mode memo, as (resolution, aspect key, (W, H)) triples.
    pub fn resolution_map(&self) -> Vec<(f64, String, (i64, i64))> {
        let mut out: Vec<_> = self
            .resolution_map
            .iter()
            .flat_map(|(r, m)| m.iter().map(move |(k, v)| (f64::from_bits(*r), k.clone(), *v)))
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        out
    }

    /// Seeds the area-mode memo (to continue an earlier discovery).
    pub fn remember_resolution(&mut self, resolution: f64, aspect_key: String, size: (i64, i64)) {
        self.resolution_map.entry(resolution.to_bits()).or_default().insert(aspect_key, size);
    }

    /// Buckets one image of oriented size (W, H); `None` when SimpleTuner drops it: below `minimum_image_size`,
    /// or an aspect ratio that rounds to 0 (SimpleTuner's discovery raises `ZeroDivisionError` and skips it).
    pub fn assign(&mut self, width: i64, height: i64) -> Result<Option<Sample>> {
        if width <= 0 || height <= 0 {
            return Err(CacheError::config("original_size", format!("invalid image dimensions ({width}, {height})")));
        }
        if !self.meets_resolution_requirements(width, height) {
            return Ok(None);
        }
        Ok(self.prepare((width, height)))
    }

    /// `MetadataBackend.meets_resolution_requirements` for image metadata.
    fn meets_resolution_requirements(&self, w: i64, h: i64) -> bool {
        let Some(min) = self.config.minimum_image_size.filter(|m| *m != 0.0) else { return true };
        match self.config.resolution_type {
            ResolutionType::Pixel => min <= w as f64 && min <= h as f64,
            ResolutionType::Area => {
                let min_px = min * 1_000_000.0;
                if self.config.crop && self.config.crop_aspect == CropAspect::Square {
                    let edge = min_px.sqrt().floor();
                    if !(edge <= w as f64 && edge <= h as f64) {
                        return false;
                    }
                }
                min_px <= (w * h) as f64
            }
        }
    }

    fn aspect_of(&self, size: (i64, i64)) -> f64 {
        py_round_digits(size.0 as f64 / size.1 as f64, self.config.rounding)
    }

    /// `TrainingSample.prepare()` for an image known only by its size.
    fn prepare(&mut self, original: (i64, i64)) -> Option<Sample> {
        let cfg = std::sync::Arc::clone(&self.config);
        let (target_area, pixel_resolution) = cfg.target_area_and_pixel_resolution();
        let (target, intermediary, mut aspect, mut crop_coordinates) =
            self.calculate_target_size(original, pixel_resolution)?;
        let resize_size;
        if cfg.crop {
            // TrainingSample.crop(): optional downsample, else resize to the intermediary size, then crop.
            let current = if self.should_resize_before_crop(original, target, target_area, pixel_resolution) {
                self.target_downsample_size(original, target)?
            } else {
                intermediary
            };
            crop_coordinates = self.crop_at(current, target);
            resize_size = current;
        } else if target != intermediary {
            // TrainingSample.resize(): resize to the intermediary size, then crop with the configured style.
            crop_coordinates = self.crop_at(intermediary, target);
            resize_size = intermediary;
        } else {
            resize_size = target;
        }
        if cfg.crop && cfg.crop_aspect == CropAspect::Square {
            aspect = 1.0;
        }
        Some(Sample {
            bucket: py_float_repr(aspect),
            aspect_ratio: aspect,
            original_size: original,
            intermediary_size: intermediary,
            target_size: target,
            crop_coordinates,
            resize_size,
        })
    }

    /// `TrainingSample.calculate_target_size` → (target, intermediary, aspect, crop coordinates it resets).
    #[allow(clippy::type_complexity)]
    fn calculate_target_size(&mut self, original: (i64, i64), pixel_resolution: i64) -> Option<((i64, i64), (i64, i64), f64, (i64, i64))> {
        let cfg = std::sync::Arc::clone(&self.config);
        let mut aspect = self.aspect_of(original);
        let square = (pixel_resolution, pixel_resolution);
        if cfg.crop && cfg.crop_aspect == CropAspect::Square {
            let (_, mut intermediary, _) = self.new_size(1.0, cfg.resolution, original)?;
            if intermediary.0 < pixel_resolution {
                intermediary = square; // correct_intermediary_square_size
            }
            return Some((square, intermediary, 1.0, (0, 0)));
        }
        if cfg.crop && matches!(cfg.crop_aspect, CropAspect::Random | CropAspect::Closest) {
            aspect = self.select_aspect(aspect);
        }
        let (mut target, mut intermediary, _) = self.new_size(aspect, cfg.resolution, original)?;
        aspect = self.aspect_of(target);
        if aspect == 1.0 && intermediary.0 < pixel_resolution {
            intermediary = square; // correct_intermediary_square_size
        }
        if aspect == 1.0 {
            target = square;
        }
        Some((target, intermediary, aspect, (0, 0)))
    }

    /// `TrainingSample._select_random_aspect` for `closest` and `random`.
    fn select_aspect(&mut self, aspect: f64) -> f64 {
        match (&self.config.crop_aspect_buckets, self.config.crop_aspect) {
            (AspectBuckets::Plain(v), CropAspect::Closest) => closest(v.iter().copied(), aspect),
            (AspectBuckets::Weighted(v), CropAspect::Closest) => closest(v.iter().map(|b| b.0), aspect),
            (AspectBuckets::Plain(v), _) => v[self.rng.choice_index(v.len())],
            (AspectBuckets::Weighted(v), _) => {
                let weights: Vec<f64> = v.iter().map(|b| b.1).collect();
                v[self.rng.weighted_index(&weights)].0
            }
        }
    }

    /// `resize_helpers[resolution_type]`: (target, intermediary, adjusted aspect); `None` where SimpleTuner
    /// divides by a zero aspect ratio.
    #[allow(clippy::type_complexity)]
    fn new_size(&mut self, aspect: f64, resolution: f64, original: (i64, i64)) -> Option<((i64, i64), (i64, i64), f64)> {
        match self.config.resolution_type {
            ResolutionType::Pixel if aspect == 0.0 && original.0 < original.1 => None,
            ResolutionType::Pixel => Some(self.new_size_by_pixel_edge(aspect, resolution as i64, original)),
            ResolutionType::Area if aspect == 0.0 => None,
            ResolutionType::Area => Some(self.new_size_by_pixel_area(aspect, resolution, original)),
        }
    }

    /// `MultiaspectImage.calculate_new_size_by_pixel_edge`.
    fn new_size_by_pixel_edge(&self, aspect: f64, resolution: i64, (w, h): (i64, i64)) -> ((i64, i64), (i64, i64), f64) {
        let align = self.config.alignment;
        let raw = w as f64 / h as f64;
        let (w_target, h_target) = if w < h {
            (resolution, (resolution as f64 / aspect) as i64)
        } else {
            ((resolution as f64 * aspect) as i64, resolution)
        };
        let w_adj = round_to_multiple(w_target as f64, align);
        let h_adj = round_to_multiple(h_target as f64, align);
        let (mut w_init, mut h_init);
        if raw >= 1.0 {
            h_init = h_adj.max(h_target);
            w_init = (h_init as f64 * raw) as i64;
            if w_init < w_adj {
                w_init = w_adj;
                h_init = (w_init as f64 / raw) as i64;
            }
        } else {
            w_init = w_adj.max(w_target);
            h_init = (w_init as f64 / raw) as i64;
            if h_init < h_adj {
                h_init = h_adj;
                w_init = (h_init as f64 * raw) as i64;
            }
        }
        ((w_adj, h_adj), (w_init, h_init), self.aspect_of((w_adj, h_adj)))
    }

    /// `MultiaspectImage.calculate_new_size_by_pixel_area`, including its aspect→resolution memo.
    fn new_size_by_pixel_area(&mut self, aspect: f64, megapixels: f64, (w, h): (i64, i64)) -> ((i64, i64), (i64, i64), f64) {
        let align = self.config.alignment;
        let edge = round_to_multiple((megapixels * 1e6).sqrt().trunc(), align);
        if aspect == 1.0 && w == h {
            return ((edge, edge), (edge, edge), aspect);
        }
        let (mut w_target, mut h_target) =
            (round_to_multiple(edge as f64 * aspect.sqrt(), align), round_to_multiple(edge as f64 / aspect.sqrt(), align));
        let raw = w as f64 / h as f64;
        let (mut w_int, mut h_int) = if w_target < h_target {
            (w_target, (w_target as f64 / raw) as i64)
        } else {
            ((h_target as f64 * raw) as i64, h_target)
        };
        let adjusted = self.aspect_of((w_target, h_target));
        let key = py_float_repr(adjusted);
        let memo = self.resolution_map.entry(megapixels.to_bits()).or_default();
        let previous = memo.get(&key).copied();
        if let Some(p) = previous {
            (w_target, h_target) = p;
        }
        if w_target > w_int || h_target > h_int {
            let (w_diff, h_diff) = if w_target > w_int {
                let d = w_target - w_int;
                (d, (d as f64 / raw) as i64)
            } else {
                let d = h_target - h_int;
                ((d as f64 * raw) as i64, d)
            };
            w_int += w_diff;
            h_int += h_diff;
        }
        if previous.is_none() {
            memo.insert(key, (w_target, h_target));
        }
        ((w_target, h_target), (w_int, h_int), adjusted)
    }

    /// `TrainingSample._should_resize_before_crop` (called with crop enabled).
    fn should_resize_before_crop(&self, current: (i64, i64), target: (i64, i64), target_area: f64, pixel_resolution: i64) -> bool {
        let on = |v: Option<f64>| v.is_some_and(|x| x != 0.0);
        if !on(self.config.maximum_image_size) || !on(self.config.target_downsample_size) {
            return false;
        }
        match self.config.resolution_type {
            ResolutionType::Pixel => current != (pixel_resolution, pixel_resolution),
            ResolutionType::Area => {
                let area = (current.0 * current.1) as f64;
                area != target_area || current.0 < target.0 || current.1 < target.1
            }
        }
    }

    /// `TrainingSample._calculate_target_downsample_size`.
    fn target_downsample_size(&mut self, original: (i64, i64), target: (i64, i64)) -> Option<(i64, i64)> {
        let tds = self.config.target_downsample_size.unwrap_or_default();
        let aspect = self.aspect_of(original);
        let (_, mut size, _) = self.new_size(aspect, tds, original)?;
        if (size.0 < target.0 && size.0 == 0) || (size.0 >= target.0 && size.1 < target.1 && size.1 == 0) {
            return None; // SimpleTuner divides by the zero edge
        }
        if size.0 < target.0 {
            let scale = target.0 as f64 / size.0 as f64;
            size = (target.0, (size.1 as f64 * scale) as i64);
        } else if size.1 < target.1 {
            let scale = target.1 as f64 / size.1 as f64;
            size = ((size.0 as f64 * scale) as i64, target.1);
        }
        Some(size)
    }

    /// `crop_handlers[crop_style].crop` on a (W, H) image → (top, left).
    fn crop_at(&mut self, (iw, ih): (i64, i64), (tw, th): (i64, i64)) -> (i64, i64) {
        match self.config.crop_style {
            CropStyle::Corner => (0, 0),
            CropStyle::Center => {
                let left = (((iw - tw) as f64 / 2.0) as i64).max(0);
                let top = (((ih - th) as f64 / 2.0) as i64).max(0);
                (top, left)
            }
            CropStyle::Random => {
                let (max_left, max_top) = ((iw - tw).max(0), (ih - th).max(0));
                let left = if max_left > 0 { self.rng.randint_to(max_left) } else { 0 };
                let top = if max_top > 0 { self.rng.randint_to(max_top) } else { 0 };
                (top, left)
            }
        }
    }
}

/// Python's `min(buckets, key=lambda b: abs(b - aspect))` (first minimum wins).
fn closest(buckets: impl Iterator<Item = f64>, aspect: f64) -> f64 {
    let mut best: Option<f64> = None;
    for b in buckets {
        if best.map_or(true, |x| (b - aspect).abs() < (x - aspect).abs()) {
            best = Some(b);
        }
    }
    best.unwrap_or(aspect)
}

/// `MultiaspectImage._round_to_nearest_multiple`: `max(round(value / multiple) * multiple, multiple)`.
fn round_to_multiple(value: f64, multiple: i64) -> i64 {
    (((value / multiple as f64).round_ties_even()) as i64 * multiple).max(multiple)
}

/// Python's `round(x, digits)`: correctly rounded decimal, ties to even on the exact binary value.
pub fn py_round_digits(x: f64, digits: i32) -> f64 {
    format!("{x:.prec$}", prec = digits as usize).parse().unwrap_or(x)
}

/// Python's `repr(float)` for the finite, moderate values aspect ratios take.
pub fn py_float_repr(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_follows_python() {
        assert_eq!(py_round_digits(1.125, 2), 1.12); // exact tie → even
        assert_eq!(py_round_digits(0.375, 2), 0.38);
        assert_eq!(py_round_digits(1.4615384615384615, 2), 1.46);
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(1.46), "1.46");
        assert_eq!(round_to_multiple(96.0, 64), 128); // round(1.5) = 2
        assert_eq!(round_to_multiple(160.0, 64), 128); // round(2.5) = 2
        assert_eq!(round_to_multiple(10.0, 64), 64);
    }

    #[test]
    fn square_crop_at_1024_pixels() {
        let mut cfg = BucketConfig::new(1024.0, ResolutionType::Pixel);
        cfg.crop = true;
        cfg.crop_style = CropStyle::Center;
        let s = Bucketer::new(cfg, 0).unwrap().assign(2000, 1000).unwrap().unwrap();
        assert_eq!(s.bucket, "1.0");
        assert_eq!(s.target_size, (1024, 1024));
        // pixel edge: H target 1024 (landscape) → intermediary (2048, 1024), centred crop at left 512.
        assert_eq!(s.intermediary_size, (2048, 1024));
        assert_eq!(s.crop_coordinates, (0, 512));
    }

    #[test]
    fn minimum_size_filters() {
        let mut cfg = BucketConfig::new(512.0, ResolutionType::Pixel);
        cfg.minimum_image_size = Some(600.0);
        let mut b = Bucketer::new(cfg, 0).unwrap();
        assert_eq!(b.assign(1000, 500).unwrap(), None);
        assert!(b.assign(1000, 700).unwrap().is_some());
    }

    #[test]
    fn invalid_settings_are_named() {
        let mut cfg = BucketConfig::new(1.0, ResolutionType::Area);
        cfg.crop = true;
        cfg.crop_aspect = CropAspect::Random;
        let err = Bucketer::new(cfg, 0).err().unwrap();
        assert!(err.to_string().contains("`crop_aspect_buckets`"), "{err}");
    }
}
