//! Property-based fuzzing of everything the cache reads from disk: index JSON (snapshot and journal), shard
//! headers, image headers. Each target mutates valid seeds (byte flips, truncation, insertion) and also feeds
//! generated hostile values; the properties: no panic, errors instead of out-of-range reads, and no file
//! outside the cache is ever touched.
//!
//! `cargo test` runs 256 cases per target (proptest's default). A longer run, as in docs/cache-build.md:
//! `PROPTEST_CASES=50000 cargo test --release -p latent_cache --test fuzz` (about 6 minutes on 2 cores).
use latent_cache::scan::header_from_bytes;
use latent_cache::store::{check, parse_index, CacheReader, CacheWriter, CheckOptions, Dtype, Index, ShardRecord, FORMAT_NAME};
use proptest::prelude::*;
use std::fs;
use std::path::Path;

fn config() -> ProptestConfig {
    // No regression files written into the source tree; PROPTEST_CASES still sets the number of cases.
    ProptestConfig { failure_persistence: None, ..ProptestConfig::default() }
}

/// A byte-level mutation of a seed: flips/sets at positions, an insertion, a truncation.
#[derive(Debug, Clone)]
struct Mutation {
    sets: Vec<(usize, u8)>,
    insert: Option<(usize, Vec<u8>)>,
    truncate: Option<usize>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop::option::of((any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))),
        prop::option::weighted(0.3, any::<usize>()),
    )
        .prop_map(|(sets, insert, truncate)| Mutation { sets, insert, truncate })
}

fn apply(seed: &[u8], m: &Mutation) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    if bytes.is_empty() {
        return bytes;
    }
    for &(pos, value) in &m.sets {
        let i = pos % bytes.len();
        bytes[i] = value;
    }
    if let Some((pos, extra)) = &m.insert {
        let i = pos % (bytes.len() + 1);
        bytes.splice(i..i, extra.iter().copied());
    }
    if let Some(len) = m.truncate {
        bytes.truncate(len % (bytes.len() + 1));
    }
    bytes
}

// ---------------------------------------------------------------- index JSON

fn valid_index_texts() -> (String, String) {
    let record = ShardRecord { file: "w-00000.safetensors".into(), bytes: 128, crc32: 7, mtime_ns: Some(1_700_000_000_000_000_000), keys: vec!["a".into(), "b/c".into()] };
    let index = Index { format: FORMAT_NAME.into(), format_version: 2, writer: "w".into(), shards: vec![record.clone()] };
    (serde_json::to_string_pretty(&index).unwrap(), format!("{}\n", serde_json::to_string(&record).unwrap()))
}

/// File names an index may carry: ours, and hostile ones.
fn shard_file_name() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..3).prop_map(|n| format!("w-{n:05}.safetensors")),
        Just("../victim.txt".to_string()),
        Just("../../victim.txt".to_string()),
        Just("sub/../../victim.txt".to_string()),
        Just("VICTIM".to_string()), // replaced by the victim's absolute path
        Just("link-00000.safetensors".to_string()),
        Just("w-00009.safetensors".to_string()), // a symlink to the victim
        "[a-z./-]{0,24}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn index_text_never_panics(text in any::<String>(), m in mutation(), pick in 0..2usize) {
        let dir = Path::new("/cache");
        let (snapshot, journal) = valid_index_texts();
        let mutated = String::from_utf8_lossy(&apply([snapshot.as_bytes(), journal.as_bytes()][pick], &m)).into_owned();
        for t in [&text, &mutated] {
            let _ = parse_index(dir, "w", Some(t), None);
            let _ = parse_index(dir, "w", None, Some(t));
            let _ = parse_index(dir, "w", Some(&snapshot), Some(t));
        }
    }

    /// Whatever an index says, reading and repairing the cache never touches a file outside it, nor a link.
    #[test]
    fn hostile_indexes_never_reach_outside_the_cache(
        records in prop::collection::vec((shard_file_name(), any::<u64>(), any::<u32>(), prop::collection::vec("[a-z]{1,3}", 0..3)), 1..5),
        full in any::<bool>(),
    ) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        fs::create_dir(&dir).unwrap();
        let victim = root.path().join("victim.txt");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("w-00009.safetensors")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("link-00000.safetensors")).unwrap();
        let mut w = CacheWriter::open(&dir, "w", 1).unwrap();
        w.put("real", Dtype::U8, vec![3], vec![1, 2, 3]).unwrap();
        w.close().unwrap();
        let mut index: Index = serde_json::from_slice(&fs::read(dir.join("index.w.json")).unwrap()).unwrap();
        for (file, bytes, crc32, keys) in records {
            let file = if file == "VICTIM" { victim.to_str().unwrap().to_string() } else { file };
            // Half the time the size matches the victim, so that only the name can stop a repair.
            let bytes = if bytes % 2 == 0 { 8 } else { bytes };
            index.shards.push(ShardRecord { file, bytes, crc32, mtime_ns: None, keys });
        }
        fs::write(dir.join("index.w.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        if let Ok(reader) = CacheReader::open(&dir, true) {
            for key in reader.keys() {
                let _ = reader.get(&key);
                let _ = reader.get_private(&key);
            }
        }
        let _ = check(&dir, CheckOptions { full, repair: true, remove_orphans: true });
        prop_assert_eq!(fs::read(&victim).unwrap(), b"precious");
        prop_assert!(dir.join("w-00009.safetensors").symlink_metadata().unwrap().file_type().is_symlink());
        prop_assert!(dir.join("link-00000.safetensors").symlink_metadata().unwrap().file_type().is_symlink());
    }
}

// ---------------------------------------------------------------- shard headers

fn seed_shard() -> &'static [u8] {
    static SEED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SEED.get_or_init(build_seed_shard)
}

fn build_seed_shard() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
    w.put("lat", Dtype::BF16, vec![2, 3, 2], (0..24).collect()).unwrap();
    w.put("ids", Dtype::I64, vec![6], (0..48).collect()).unwrap();
    w.put("one", Dtype::F32, vec![1], vec![0, 0, 128, 63]).unwrap();
    w.close().unwrap();
    fs::read(dir.path().join("w-00000.safetensors")).unwrap()
}

fn header_json() -> impl Strategy<Value = String> {
    let dtype = prop_oneof![Just("F32"), Just("BF16"), Just("I64"), Just("U8"), Just("F8_E4M3"), Just("C64"), Just("NOPE")];
    let dim = prop_oneof![0usize..5, Just(usize::MAX), Just(usize::MAX / 2 + 1), any::<usize>()];
    let offset = prop_oneof![0usize..64, Just(usize::MAX), any::<usize>()];
    prop::collection::vec(("[a-z]{1,4}", dtype, prop::collection::vec(dim, 0..4), offset.clone(), offset), 0..4).prop_map(|tensors| {
        let body: Vec<String> = tensors
            .iter()
            .map(|(k, d, shape, s, e)| format!(r#""{k}":{{"dtype":"{d}","shape":{shape:?},"data_offsets":[{s},{e}]}}"#))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

/// Serves a shard after every check it passes: what comes back must lie inside the file and match its shape.
fn read_everything(dir: &Path) {
    let Ok(reader) = CacheReader::open(dir, true) else { return };
    let file_len = fs::metadata(dir.join("w-00000.safetensors")).map(|m| m.len() as usize).unwrap_or(0);
    for key in reader.keys() {
        if let Ok(entry) = reader.locate(&key) {
            let elements: usize = entry.shape.iter().product();
            assert_eq!(entry.len, elements * entry.dtype.size());
            assert!(entry.offset.checked_add(entry.len).is_some_and(|end| end <= file_len));
            assert_eq!(reader.get(&key).unwrap().len(), entry.len);
            assert_eq!(reader.get_private(&key).unwrap().0.len(), entry.len);
            let mut out = vec![0u8; entry.len];
            reader.gather(std::slice::from_ref(&key), &mut out).unwrap();
        } else {
            assert!(reader.get(&key).is_err() && reader.get_private(&key).is_err());
        }
    }
    let _ = check(dir, CheckOptions { full: true, repair: false, remove_orphans: false });
}

/// An index that lists `bytes` as shard 0 with the right size and CRC, so the header parser is what decides.
fn write_cache(dir: &Path, bytes: &[u8], keys: Vec<String>) {
    fs::write(dir.join("w-00000.safetensors"), bytes).unwrap();
    let record = ShardRecord { file: "w-00000.safetensors".into(), bytes: bytes.len() as u64, crc32: crc32fast::hash(bytes), mtime_ns: None, keys };
    let index = Index { format: FORMAT_NAME.into(), format_version: 2, writer: "w".into(), shards: vec![record] };
    fs::write(dir.join("index.w.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_shards_are_refused_or_served_in_bounds(m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = apply(seed_shard(), &m);
        write_cache(dir.path(), &bytes, vec!["lat".into(), "ids".into(), "one".into()]);
        read_everything(dir.path());
    }

    #[test]
    fn generated_headers_are_refused_or_served_in_bounds(
        json in header_json(),
        declared in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        data_len in 0usize..128,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let n = declared.unwrap_or(json.len() as u64);
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend(json.as_bytes());
        bytes.extend(std::iter::repeat(7u8).take(data_len));
        let keys = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json).map(|m| m.keys().cloned().collect()).unwrap_or_default();
        write_cache(dir.path(), &bytes, keys);
        read_everything(dir.path());
    }
}

// ---------------------------------------------------------------- image headers

fn seed_images() -> Vec<Vec<u8>> {
    use image::{ImageEncoder, ExtendedColorType};
    let pixels = vec![200u8; 7 * 5 * 3];
    let mut seeds = Vec::new();
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(&pixels, 7, 5, ExtendedColorType::Rgb8).unwrap();
    seeds.push(png);
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp).write_image(&pixels, 7, 5, ExtendedColorType::Rgb8).unwrap();
    seeds.push(webp);
    let mut bmp = Vec::new();
    image::codecs::bmp::BmpEncoder::new(&mut bmp).write_image(&pixels, 7, 5, ExtendedColorType::Rgb8).unwrap();
    seeds.push(bmp);
    let mut gif = Vec::new();
    image::codecs::gif::GifEncoder::new(&mut gif).encode(&[9u8; 7 * 5 * 4], 7, 5, ExtendedColorType::Rgba8).unwrap();
    seeds.push(gif);
    // JPEG: SOI, APP1 with a big-endian EXIF orientation 6, SOF0 of 7x5, EOI.
    let tiff: Vec<u8> = [&b"MM\0\x2a\0\0\0\x08\0\x01"[..], &[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0], &[0, 0, 0, 0]].concat();
    let app1 = [&b"Exif\0\0"[..], &tiff].concat();
    let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE1];
    jpeg.extend(((app1.len() + 2) as u16).to_be_bytes());
    jpeg.extend(&app1);
    jpeg.extend([0xFF, 0xC0, 0, 17, 8, 0, 5, 0, 7, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
    seeds.push(jpeg);
    seeds
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn image_headers_never_panic(pick in 0usize..5, m in mutation(), noise in prop::collection::vec(any::<u8>(), 0..64)) {
        let seeds = seed_images();
        let path = Path::new("fuzz.img");
        if let Ok(h) = header_from_bytes(path, &apply(&seeds[pick], &m)) {
            prop_assert!(h.width > 0 && h.height > 0 && (1..=8).contains(&h.orientation));
        }
        let _ = header_from_bytes(path, &noise);
    }
}

#[test]
fn image_seeds_are_valid() {
    let sizes: Vec<(u32, u32)> = seed_images().iter().map(|s| header_from_bytes(Path::new("seed"), s).unwrap().oriented_size()).collect();
    assert_eq!(sizes, vec![(7, 5), (7, 5), (7, 5), (7, 5), (5, 7)]);
}
