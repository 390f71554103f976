//! A dataset's plan as columns: which images of a folder's inventory are trained on, the bucket each lands in and
//! the store key of each latent. A plan holds millions of rows; they live here, and the caller asks for objects
//! only for the rows it works on (what changed, what failed).
use crate::bucket::{py_float_repr, Bucketer, Sample};
use crate::inventory::{by_components, Inventory};
use crate::memo::CaptionRef;
use crate::store::CacheReader;
use crate::Result;
use rayon::prelude::*;
use foldhash::fast::FixedState;
use hashbrown::HashTable;
use sha2::{Digest, Sha256};
use std::hash::BuildHasher;
use std::collections::HashMap;

/// Why an image whose header was read is not planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftOut {
    /// Its sizes come from a table with no row for it (SimpleTuner's parquet backend leaves it out too).
    NoSize,
    /// Below `minimum_image_size`, or an aspect that rounds to 0: SimpleTuner drops it.
    TooSmall,
    /// Its bucket's aspect ratio is below `minimum_aspect_ratio`.
    AspectBelowMinimum,
    /// Its bucket's aspect ratio is above `maximum_aspect_ratio`.
    AspectAboveMaximum,
    /// Its caption file exists but cannot be read.
    CaptionUnreadable,
    /// The caption strategy needs a caption file and there is none.
    CaptionMissing,
    /// A reason of the caller's (`Rules::refused`).
    Refused,
}

/// What decides which images of an inventory are planned, besides the bucketer.
#[derive(Debug, Default)]
pub struct Rules<'a> {
    /// (W, H) per inventory row from another source than the headers (a parquet table); `None` in a row: no size.
    pub sizes: Option<&'a [Option<(u32, u32)>]>,
    /// Whether an image without a caption file is left out (caption_strategy textfile).
    pub caption_file_required: bool,
    /// Inventory rows the caller refuses after the bucketing filters (sorted).
    pub refused: &'a [u32],
    /// SimpleTuner's bucket filters on the bucket's aspect ratio (W/H).
    pub minimum_aspect_ratio: Option<f64>,
    /// See `minimum_aspect_ratio`.
    pub maximum_aspect_ratio: Option<f64>,
}

/// One dataset's planned images, in inventory order.
#[derive(Debug, Default)]
pub struct Plan {
    /// Inventory row of each planned image (ascending).
    pub rows: Vec<u32>,
    /// Index into `samples` of each planned image.
    pub sample_of: Vec<u32>,
    /// The bucketer's distinct answers.
    pub samples: Vec<Sample>,
    /// Inventory rows read but not planned, and why, in row order.
    pub left_out: Vec<(u32, LeftOut)>,
}

/// A sample's fields as a map key, its bucket by hash (no allocation per image; a hit is compared whole).
type SampleKey = (u64, u64, [(i64, i64); 5]);

/// Buckets the readable images of `inventory` in row order (the bucketer's random crops follow that order, as
/// SimpleTuner's discovery does) and applies `rules`, in SimpleTuner's order: size, minimum size, aspect filters,
/// then caption problems.
pub fn plan(inventory: &Inventory, bucketer: &mut Bucketer, rules: &Rules) -> Result<Plan> {
    let mut plan = Plan::default();
    let mut distinct: HashMap<SampleKey, u32> = HashMap::new();
    let mut refused = rules.refused.iter().peekable();
    for row in 0..inventory.len() {
        let caption = inventory.caption(row);
        let item_size = inventory.size(row);
        let row = row as u32;
        let size = match rules.sizes {
            Some(sizes) => match (item_size.is_ok(), sizes[row as usize]) {
                (false, _) => continue,
                (true, None) => {
                    plan.left_out.push((row, LeftOut::NoSize));
                    continue;
                }
                (true, Some(size)) => size,
            },
            None => match item_size {
                Ok(size) => size,
                Err(_) => continue,
            },
        };
        let Some(sample) = bucketer.assign(size.0 as i64, size.1 as i64)? else {
            plan.left_out.push((row, LeftOut::TooSmall));
            continue;
        };
        let why = if rules.minimum_aspect_ratio.is_some_and(|limit| bucket_ratio(&sample) < limit) {
            Some(LeftOut::AspectBelowMinimum)
        } else if rules.maximum_aspect_ratio.is_some_and(|limit| bucket_ratio(&sample) > limit) {
            Some(LeftOut::AspectAboveMaximum)
        } else if matches!(caption, CaptionRef::Unreadable(..)) {
            Some(LeftOut::CaptionUnreadable)
        } else if rules.caption_file_required && !matches!(caption, CaptionRef::Text(..)) {
            Some(LeftOut::CaptionMissing)
        } else {
            while refused.next_if(|&&r| r < row).is_some() {}
            refused.next_if_eq(&&row).map(|_| LeftOut::Refused)
        };
        if let Some(why) = why {
            plan.left_out.push((row, why));
            continue;
        }
        let key = (FixedState::default().hash_one(&sample.bucket), sample.aspect_ratio.to_bits(), [
            sample.original_size, sample.intermediary_size, sample.target_size, sample.crop_coordinates, sample.resize_size,
        ]);
        let next = plan.samples.len() as u32;
        let mut index = *distinct.entry(key).or_insert(next);
        if index != next && plan.samples[index as usize] != sample {
            index = next; // two buckets whose names hash alike: kept apart
        }
        if index == next {
            plan.samples.push(sample);
        }
        plan.rows.push(row);
        plan.sample_of.push(index);
    }
    Ok(plan)
}

/// The bucket's key read as a number, as SimpleTuner's aspect filters do (`float(bucket)`).
fn bucket_ratio(sample: &Sample) -> f64 {
    sample.bucket.parse().unwrap_or(sample.aspect_ratio)
}

impl Plan {
    /// Number of planned images.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The sample of planned image `position`.
    pub fn sample(&self, position: usize) -> &Sample {
        &self.samples[self.sample_of[position] as usize]
    }

    /// Position of the planned image whose inventory key is `key` (the inventory is sorted by components).
    pub fn position_of(&self, inventory: &Inventory, key: &str) -> Option<usize> {
        self.rows.binary_search_by(|&row| by_components(inventory.key(row as usize), key)).ok()
    }

    /// Every image's recipe digest (what its latent is a function of, see `recipe_digest`), computed on rayon.
    pub fn recipes(&self, inventory: &Inventory, fingerprint: &str) -> Vec<[u8; 8]> {
        (0..self.len())
            .into_par_iter()
            .map(|p| recipe_digest(fingerprint, self.sample(p), inventory.content(self.rows[p] as usize)))
            .collect()
    }

    /// The store key of planned image `position`: its inventory key, '@', its recipe digest.
    pub fn store_key(&self, inventory: &Inventory, recipes: &[[u8; 8]], position: usize) -> String {
        format!("{}@{}", inventory.key(self.rows[position] as usize), hex(&recipes[position]))
    }

    /// Whether `store` holds the entry `<store key><suffix>` of each planned image (on rayon): its latent for an
    /// empty suffix.
    pub fn held_by(&self, inventory: &Inventory, recipes: &[[u8; 8]], store: &CacheReader, suffix: &str) -> Vec<bool> {
        (0..self.len()).into_par_iter().map(|p| store.contains(&(self.store_key(inventory, recipes, p) + suffix))).collect()
    }

    /// SHA-256 of every planned image's store key and caption source (its caption file's text; other strategies
    /// derive captions from the key or the dataset): two plans with equal digests encode the same latents and
    /// captions.
    pub fn digest(&self, inventory: &Inventory, recipes: &[[u8; 8]]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for (p, &row) in self.rows.iter().enumerate() {
            let key = inventory.key(row as usize);
            hasher.update((key.len() as u64).to_le_bytes());
            hasher.update(key.as_bytes());
            hasher.update(recipes[p]);
            match inventory.caption(row as usize) {
                CaptionRef::Text(_, text) => {
                    hasher.update(b"T");
                    hasher.update((text.len() as u64).to_le_bytes());
                    hasher.update(text.as_bytes());
                }
                _ => hasher.update(b"-"),
            }
        }
        hasher.finalize().into()
    }

    /// SimpleTuner's two bucket files for the planned images `positions` (ascending) of a dataset in `folder`
    /// (absolute, ending in '/'): the JSON of `aspect_ratio_bucket_indices_<id>.json` and of
    /// `aspect_ratio_bucket_metadata_<id>.json`, written as Python's `json.dumps` writes them.
    pub fn bucket_files(&self, inventory: &Inventory, folder: &str, positions: &[u32]) -> (String, String) {
        let mut metadata = String::with_capacity(positions.len() * 200);
        metadata.push('{');
        let templates: Vec<String> = self.samples.iter().map(metadata_json).collect();
        for (n, &p) in positions.iter().enumerate() {
            if n > 0 {
                metadata.push_str(", ");
            }
            python_json_string(&mut metadata, folder, inventory.key(self.rows[p as usize] as usize));
            metadata.push_str(": ");
            metadata.push_str(&templates[self.sample_of[p as usize] as usize]);
        }
        metadata.push('}');
        let mut indices = String::from("{\"config\": {}, \"aspect_ratio_bucket_indices\": {");
        for (b, (bucket, members)) in self.by_bucket(positions.iter().copied()).iter().enumerate() {
            if b > 0 {
                indices.push_str(", ");
            }
            python_json_string(&mut indices, bucket, "");
            indices.push_str(": [");
            for (n, &p) in members.iter().enumerate() {
                if n > 0 {
                    indices.push_str(", ");
                }
                python_json_string(&mut indices, folder, inventory.key(self.rows[p as usize] as usize));
            }
            indices.push(']');
        }
        indices.push_str("}}");
        (indices, metadata)
    }

    /// `positions` grouped by bucket, buckets in order of first appearance (SimpleTuner's dict order), each group in
    /// the order given.
    fn by_bucket(&self, positions: impl Iterator<Item = u32>) -> Vec<(&str, Vec<u32>)> {
        let mut groups: Vec<(&str, Vec<u32>)> = Vec::new();
        let mut slot_of: HashMap<&str, usize> = HashMap::new();
        for p in positions {
            let bucket = self.sample(p as usize).bucket.as_str();
            let slot = *slot_of.entry(bucket).or_insert_with(|| {
                groups.push((bucket, Vec::new()));
                groups.len() - 1
            });
            groups[slot].1.push(p);
        }
        groups
    }

    /// Planned positions grouped by bucket (buckets in order of first appearance, positions ascending) and cut into
    /// batches of `size`: the VAE batches every rank derives alike.
    pub fn batches(&self, size: usize) -> Vec<(&str, Vec<u32>)> {
        let size = size.max(1);
        let groups = self.by_bucket(0..self.len() as u32);
        groups.into_iter().flat_map(|(bucket, all)| all.chunks(size).map(|c| (bucket, c.to_vec())).collect::<Vec<_>>()).collect()
    }
}

/// A plan's positions by inventory key, hashed: the trainer asks for one image at a time, once per image in each of
/// SimpleTuner's passes over a dataset, where a binary search by components costs a microsecond.
pub struct KeyIndex {
    table: HashTable<u32>,
    hasher: FixedState,
}

impl KeyIndex {
    /// Indexes every planned image of `plan` (about 5 bytes each).
    pub fn new(plan: &Plan, inventory: &Inventory) -> KeyIndex {
        let hasher = FixedState::default();
        let key_of = |p: u32| inventory.key(plan.rows[p as usize] as usize);
        let mut table = HashTable::with_capacity(plan.len());
        for p in 0..plan.len() as u32 {
            table.insert_unique(hasher.hash_one(key_of(p)), p, |&q| hasher.hash_one(key_of(q)));
        }
        KeyIndex { table, hasher }
    }

    /// The position of the planned image with inventory key `key` (`plan` and `inventory` those it was built on).
    pub fn position_of(&self, plan: &Plan, inventory: &Inventory, key: &str) -> Option<usize> {
        let found = self.table.find(self.hasher.hash_one(key), |&q| inventory.key(plan.rows[q as usize] as usize) == key);
        found.map(|&q| q as usize)
    }

    /// `position_of` each of `keys` (None stays None), in parallel: the lookups miss the cache more than they compute.
    pub fn positions_of(&self, plan: &Plan, inventory: &Inventory, keys: &[Option<&str>]) -> Vec<Option<usize>> {
        keys.par_iter().map(|key| key.and_then(|key| self.position_of(plan, inventory, key))).collect()
    }
}

/// First 8 bytes of the SHA-256 of one latent's recipe as canonical JSON (sorted keys, no spaces): the fingerprint
/// digest, the content hash (32 hex digits) and the bucketer's geometry. Caches name entries by it, so it must stay
/// byte-for-byte what `json.dumps(recipe, sort_keys=True, separators=(",", ":"))` gives.
pub fn recipe_digest(fingerprint: &str, sample: &Sample, content: u128) -> [u8; 8] {
    let (ow, oh) = sample.original_size;
    let (iw, ih) = sample.intermediary_size;
    let (top, left) = sample.crop_coordinates;
    let (tw, th) = sample.target_size;
    let canonical = format!(
        "{{\"content\":\"{content:032x}\",\"crop_coordinates\":[{top},{left}],\"fingerprint\":\"{fingerprint}\",\
         \"intermediary_size\":[{iw},{ih}],\"original_size\":[{ow},{oh}],\"target_size\":[{tw},{th}]}}"
    );
    let digest = Sha256::digest(canonical.as_bytes());
    digest[..8].try_into().expect("a SHA-256 digest has 32 bytes")
}

/// 16 lower-case hex digits of a recipe digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// One image's bucket metadata as SimpleTuner's discovery saves it (keys in its order).
fn metadata_json(s: &Sample) -> String {
    let pair = |(a, b): (i64, i64)| format!("[{a}, {b}]");
    format!(
        "{{\"original_size\": {}, \"crop_coordinates\": {}, \"target_size\": {}, \"intermediary_size\": {}, \"aspect_ratio\": {}}}",
        pair(s.original_size),
        pair(s.crop_coordinates),
        pair(s.target_size),
        pair(s.intermediary_size),
        py_float_repr(s.aspect_ratio)
    )
}

/// Appends `head` + `tail` as one JSON string the way Python's `json.dumps` (ensure_ascii) writes it: printable
/// ASCII as is, `"` and `\` escaped, the usual short escapes, everything else as `\uXXXX` (UTF-16 pairs above the BMP).
pub fn python_json_string(out: &mut String, head: &str, tail: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in head.chars().chain(tail.chars()) {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{BucketConfig, ResolutionType};
    use crate::inventory::{Caption, Item, Stamp};

    fn item(key: &str, size: Option<(u32, u32)>, caption: Caption) -> Item {
        Item {
            key: key.into(),
            stamp: Stamp::default(),
            size: size.ok_or_else(|| "unreadable".to_string()),
            content: key.len() as u128,
            caption,
            read: true,
        }
    }

    fn inventory(items: Vec<Item>) -> Inventory {
        Inventory::of_items(&items)
    }

    fn bucketer(minimum: Option<f64>) -> Bucketer {
        let mut config = BucketConfig::new(64.0, ResolutionType::Pixel);
        config.minimum_image_size = minimum;
        Bucketer::new(config, 0).unwrap()
    }

    fn text(t: &str) -> Caption {
        Caption::Text(Stamp::default(), t.into())
    }

    #[test]
    fn rows_are_left_out_in_simpletuners_order_and_equal_answers_share_a_sample() {
        let inv = inventory(vec![
            item("a.png", Some((64, 64)), text("a")),
            item("b.png", None, text("b")),
            item("c.png", Some((16, 16)), text("c")),
            item("d.png", Some((128, 32)), text("d")),
            item("e.png", Some((64, 64)), Caption::Unreadable(Stamp::default(), "not UTF-8".into())),
            item("f.png", Some((64, 64)), Caption::Missing),
            item("g.png", Some((64, 64)), text("g")),
            item("h.png", Some((64, 64)), text("h")),
        ]);
        let rules = Rules { caption_file_required: true, refused: &[7], maximum_aspect_ratio: Some(2.0), ..Rules::default() };
        let plan = plan(&inv, &mut bucketer(Some(32.0)), &rules).unwrap();
        assert_eq!(plan.rows, vec![0, 6]);
        assert_eq!(plan.samples.len(), 1);
        assert_eq!(plan.sample_of, vec![0, 0]);
        assert_eq!(
            plan.left_out,
            vec![
                (2, LeftOut::TooSmall),
                (3, LeftOut::AspectAboveMaximum),
                (4, LeftOut::CaptionUnreadable),
                (5, LeftOut::CaptionMissing),
                (7, LeftOut::Refused)
            ]
        );
        assert_eq!(plan.position_of(&inv, "g.png"), Some(1));
        assert_eq!(plan.position_of(&inv, "b.png"), None);
        let index = KeyIndex::new(&plan, &inv);
        assert_eq!(index.position_of(&plan, &inv, "g.png"), Some(1));
        assert_eq!(index.position_of(&plan, &inv, "a.png"), Some(0));
        assert_eq!(index.position_of(&plan, &inv, "b.png"), None);
        assert_eq!(index.position_of(&plan, &inv, ""), None);
    }

    #[test]
    fn sizes_from_a_table_replace_the_headers() {
        let inv = inventory(vec![item("a.png", Some((64, 64)), Caption::NotRead), item("b.png", Some((64, 64)), Caption::NotRead)]);
        let sizes = [None, Some((128, 64))];
        let plan = plan(&inv, &mut bucketer(None), &Rules { sizes: Some(&sizes), ..Rules::default() }).unwrap();
        assert_eq!(plan.rows, vec![1]);
        assert_eq!(plan.left_out, vec![(0, LeftOut::NoSize)]);
        assert_eq!(plan.sample(0).original_size, (128, 64));
    }

    #[test]
    fn the_recipe_digest_hashes_the_canonical_json_by_hand() {
        let sample = Sample {
            bucket: "1.0".into(),
            aspect_ratio: 1.0,
            original_size: (640, 480),
            intermediary_size: (85, 64),
            target_size: (64, 64),
            crop_coordinates: (0, 10),
            resize_size: (85, 64),
        };
        let text = "{\"content\":\"000000000000000000000000000000ff\",\"crop_coordinates\":[0,10],\"fingerprint\":\"abc\",\
                    \"intermediary_size\":[85,64],\"original_size\":[640,480],\"target_size\":[64,64]}";
        assert_eq!(recipe_digest("abc", &sample, 255).to_vec(), Sha256::digest(text.as_bytes())[..8].to_vec());
    }

    #[test]
    fn json_strings_are_escaped_as_pythons_json_dumps() {
        let mut out = String::new();
        python_json_string(&mut out, "/d/", "é \"q\"\\\n\u{1}\u{7f}😀~");
        assert_eq!(out, "\"/d/\\u00e9 \\\"q\\\"\\\\\\n\\u0001\\u007f\\ud83d\\ude00~\"");
    }

    #[test]
    fn batches_group_by_bucket_in_first_appearance_order() {
        let inv = inventory(vec![
            item("a.png", Some((64, 64)), Caption::NotRead),
            item("b.png", Some((128, 64)), Caption::NotRead),
            item("c.png", Some((64, 64)), Caption::NotRead),
            item("d.png", Some((64, 64)), Caption::NotRead),
        ]);
        let plan = plan(&inv, &mut bucketer(None), &Rules::default()).unwrap();
        let batches = plan.batches(2);
        let shape: Vec<(String, Vec<u32>)> = batches.into_iter().map(|(b, p)| (b.to_string(), p)).collect();
        assert_eq!(shape, vec![("1.0".into(), vec![0, 2]), ("1.0".into(), vec![3]), ("2.0".into(), vec![1])]);
    }
}
