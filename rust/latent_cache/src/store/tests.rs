use super::*;
use std::io::Write;

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn put_f32(w: &mut CacheWriter, key: &str, values: &[f32]) {
    w.put(key, Dtype::F32, vec![values.len()], f32_bytes(values)).unwrap();
}

/// An open writer whose every put seals a shard (1-byte limit): `keys[i]`, holding `[i + 1.0]`, alone in shard i.
fn one_entry_shards(dir: &Path, writer: &str, keys: &[&str]) -> CacheWriter {
    let mut w = CacheWriter::open(dir, writer, 1).unwrap();
    for (i, key) in keys.iter().enumerate() {
        put_f32(&mut w, key, &[i as f32 + 1.0]);
    }
    w
}

fn write_index(dir: &Path, writer: &str, records: &[ShardRecord]) {
    let index = Index { format: FORMAT_NAME.into(), format_version: FORMAT_VERSION, writer: writer.into(), shards: records.to_vec() };
    fs::write(dir.join(format!("index.{writer}.json")), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn record(file: &str, bytes: u64, crc32: u32, keys: &[&str]) -> ShardRecord {
    ShardRecord { file: file.into(), bytes, crc32, mtime_ns: None, keys: keys.iter().map(|k| k.to_string()).collect() }
}

/// A file outside the cache that a hostile or broken index points at.
fn victim(root: &Path) -> PathBuf {
    let path = root.join("victim.txt");
    fs::write(&path, b"precious user data").unwrap();
    path
}

#[test]
fn round_trip_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "rank0", 16).unwrap();
    put_f32(&mut w, "a", &[1.0, 2.0, 3.0, 4.0]); // 16 bytes: seals shard 0
    put_f32(&mut w, "b", &[5.0]);
    w.close().unwrap();
    assert_eq!(w.shard_count(), 2);
    let w2 = CacheWriter::open(dir.path(), "rank1", 16).unwrap();
    assert!(w2.contains("a") && w2.contains("b"));
    let r = CacheReader::open(dir.path(), true).unwrap();
    assert_eq!(r.keys(), vec!["a", "b"]);
    assert_eq!(r.get("b").unwrap(), 5.0f32.to_le_bytes());
    let e = r.locate("a").unwrap();
    assert_eq!((e.dtype, e.shape.clone(), e.offset % 4), (Dtype::F32, vec![4], 0));
    assert!(matches!(r.get("zz"), Err(CacheError::KeyNotFound { .. })));
}

#[test]
fn shards_are_standard_safetensors_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
    w.put("lat", Dtype::BF16, vec![2, 3], vec![7; 12]).unwrap();
    put_f32(&mut w, "emb", &[1.5, -2.0]);
    w.close().unwrap();
    let bytes = fs::read(dir.path().join("w-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let lat = st.tensor("lat").unwrap();
    assert_eq!((lat.dtype(), lat.shape(), lat.data()), (safetensors::Dtype::BF16, &[2usize, 3][..], &[7u8; 12][..]));
    assert_eq!(st.tensor("emb").unwrap().data(), f32_bytes(&[1.5, -2.0]));
}

#[test]
fn corrupt_shard_is_reported_never_served_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
    put_f32(&mut w, "x", &[1.0; 8]);
    w.commit().unwrap();
    put_f32(&mut w, "y", &[2.0; 8]);
    w.close().unwrap();
    let shard = dir.path().join("w-00000.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    fs::write(&shard, bytes).unwrap();
    let r = CacheReader::open(dir.path(), true).unwrap();
    let err = r.get("x").unwrap_err();
    assert!(err.to_string().contains("w-00000.safetensors") && err.to_string().contains("crc32"), "{err}");
    assert!(r.get("y").is_ok());
    let report = check(dir.path(), CheckOptions { full: true, repair: true, remove_orphans: false }).unwrap();
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].action, Action::Deleted);
    assert!(matches!(report.problems[0].fault, ShardFault::Corrupt(_)));
    assert!(!shard.exists());
    assert!(verify(dir.path(), false).unwrap().is_empty());
    let w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
    assert!(!w.contains("x") && w.contains("y"));
}

#[test]
fn missing_shard_is_dropped_from_its_index() {
    let dir = tempfile::tempdir().unwrap();
    one_entry_shards(dir.path(), "w", &["x", "y"]).close().unwrap();
    fs::remove_file(dir.path().join("w-00001.safetensors")).unwrap();
    let report = check(dir.path(), CheckOptions { full: false, repair: true, remove_orphans: false }).unwrap();
    assert_eq!(report.problems.len(), 1);
    assert_eq!((report.problems[0].fault.reason(), report.problems[0].action), ("missing", Action::Dropped));
    assert_eq!(read_index(dir.path(), "w").unwrap().shards.len(), 1);
}

#[test]
fn wrong_version_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("index.w.json"), br#"{"format":"lcm-latent-cache","format_version":99,"writer":"w","shards":[]}"#).unwrap();
    let err = CacheReader::open(dir.path(), true).err().unwrap();
    assert!(err.to_string().contains("format_version 99"), "{err}");
}

/// Indexes that name files outside the cache, or that are not shards: a repair drops the entries and never
/// touches the files.
#[test]
fn repair_never_touches_files_outside_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    fs::create_dir(&dir).unwrap();
    let victim = victim(root.path());
    let absolute = victim.to_str().unwrap().to_string();
    fs::create_dir(dir.join("w-00003.safetensors")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("w-00002.safetensors")).unwrap();
    write_index(
        &dir,
        "w",
        &[
            record("../victim.txt", 1, 0, &["a"]),
            record(&absolute, 1, 0, &["b"]),
            record("w-00002.safetensors", 1, 0, &["c"]),
            record("w-00003.safetensors", 1, 0, &["d"]),
        ],
    );
    let reader = CacheReader::open(&dir, true).unwrap();
    for key in ["a", "b", "c", "d"] {
        let err = reader.get(key).unwrap_err().to_string();
        assert!(err.contains("not a shard name") || err.contains("symbolic link") || err.contains("not a regular file"), "{err}");
    }
    let report = check(&dir, CheckOptions { full: true, repair: true, remove_orphans: true }).unwrap();
    assert_eq!(report.problems.len(), 4);
    for p in &report.problems {
        assert!(matches!(p.fault, ShardFault::Foreign(_)), "{p:?}");
        assert_eq!(p.action, Action::Dropped, "{p:?}");
    }
    assert_eq!(fs::read(&victim).unwrap(), b"precious user data");
    assert!(dir.join("w-00002.safetensors").symlink_metadata().unwrap().file_type().is_symlink());
    assert!(dir.join("w-00003.safetensors").is_dir());
    assert!(read_index(&dir, "w").unwrap().shards.is_empty());
    // The next shard of `w` takes a fresh number instead of writing over the link or the folder.
    one_entry_shards(&dir, "w", &["a"]).close().unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious user data");
    assert_eq!(read_index(&dir, "w").unwrap().shards[0].file, "w-00000.safetensors");
}

#[test]
fn a_shard_name_of_another_writer_is_foreign() {
    let dir = tempfile::tempdir().unwrap();
    one_entry_shards(dir.path(), "v", &["x"]).close().unwrap();
    let theirs = read_index(dir.path(), "v").unwrap().shards[0].clone();
    write_index(dir.path(), "w", &[ShardRecord { crc32: theirs.crc32 ^ 1, ..theirs }]);
    let report = check(dir.path(), CheckOptions { full: true, repair: true, remove_orphans: false }).unwrap();
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].action, Action::Dropped);
    assert!(dir.path().join("v-00000.safetensors").exists());
    assert!(verify(dir.path(), false).unwrap().is_empty());
}

#[test]
fn orphans_are_reported_and_removed_only_on_request() {
    let dir = tempfile::tempdir().unwrap();
    one_entry_shards(dir.path(), "w", &["x"]).close().unwrap();
    let ours = ["w-00007.safetensors", "w-00008.safetensors.tmp", "index.w.json.tmp", "rank3-00000.safetensors", "w-00009.tmp"];
    let not_ours = ["notes.txt", "other.safetensors", "w-1.safetensors", "model.tmp"];
    for name in ours.iter().chain(&not_ours) {
        fs::write(dir.path().join(name), b"x").unwrap();
    }
    let names = |paths: &[PathBuf]| {
        let mut n: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        n.sort();
        n
    };
    let mut expected: Vec<String> = ours.iter().map(|s| s.to_string()).collect();
    expected.sort();
    let report = check(dir.path(), CheckOptions { full: true, repair: true, remove_orphans: false }).unwrap();
    assert!(report.problems.is_empty());
    assert_eq!(names(&report.orphans), expected);
    assert!(ours.iter().all(|n| dir.path().join(n).exists()));

    let held = CacheWriter::open(dir.path(), "rank3", 1).unwrap();
    let report = check(dir.path(), CheckOptions { full: false, repair: false, remove_orphans: true }).unwrap();
    assert_eq!(names(&report.orphans), vec!["rank3-00000.safetensors"], "a live writer's files are left to it");
    assert_eq!(names(&report.removed_orphans).len(), ours.len() - 1);
    drop(held);
    assert!(not_ours.iter().all(|n| dir.path().join(n).exists()));
    assert!(dir.path().join("w-00000.safetensors").exists());
}

#[test]
fn repair_leaves_a_live_writers_shards_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = one_entry_shards(dir.path(), "w", &["x"]);
    let shard = dir.path().join("w-00000.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&shard, &bytes).unwrap();
    let report = check(dir.path(), CheckOptions { full: true, repair: true, remove_orphans: false }).unwrap();
    assert_eq!(report.problems[0].action, Action::Kept);
    assert!(report.problems[0].fault.reason().contains("held by a running process"));
    assert!(shard.exists());
    w.close().unwrap();
    let report = check(dir.path(), CheckOptions { full: true, repair: true, remove_orphans: false }).unwrap();
    assert_eq!(report.problems[0].action, Action::Deleted);
}

#[test]
fn commits_append_to_a_journal_and_close_compacts_it() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("index.w.json");
    let journal = dir.path().join("index.w.journal");
    let mut w = CacheWriter::open(dir.path(), "w", 1).unwrap();
    let empty = fs::read(&snapshot).unwrap();
    for i in 0..5 {
        put_f32(&mut w, &format!("k{i}"), &[i as f32]);
        assert_eq!(fs::read(&snapshot).unwrap(), empty, "a commit never rewrites the snapshot");
        assert_eq!(fs::read_to_string(&journal).unwrap().lines().count(), i + 1);
    }
    // A reader sees journaled shards while the writer is still open.
    assert_eq!(CacheReader::open(dir.path(), true).unwrap().len(), 5);
    w.close().unwrap();
    assert!(!journal.exists());
    assert_eq!(read_index(dir.path(), "w").unwrap().shards.len(), 5);
    assert!(fs::read_to_string(&snapshot).unwrap().contains("\"format_version\": 2"));
}

#[test]
fn a_torn_journal_line_loses_only_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    drop(one_entry_shards(dir.path(), "w", &["a", "b"])); // as a kill would: no compaction
    let journal = dir.path().join("index.w.journal");
    let text = fs::read_to_string(&journal).unwrap();
    let cut = text.trim_end().rfind('\n').unwrap() + 20;
    fs::write(&journal, &text[..cut]).unwrap();
    let r = CacheReader::open(dir.path(), true).unwrap();
    assert_eq!(r.keys(), vec!["a"]);
    let report = check(dir.path(), CheckOptions::default()).unwrap();
    assert!(report.problems.is_empty());
    assert_eq!(report.orphans, vec![dir.path().join("w-00001.safetensors")]);
    let mut w = CacheWriter::open(dir.path(), "w", 1).unwrap();
    assert!(!journal.exists(), "open compacts");
    assert!(!w.contains("b"));
    put_f32(&mut w, "b", &[2.0]);
    w.close().unwrap();
    assert_eq!(read_index(dir.path(), "w").unwrap().shards[1].file, "w-00002.safetensors");
}

#[test]
fn version_1_caches_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let data = f32_bytes(&[3.0, 4.0]);
    let bytes = safetensors::serialize([("k", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap())], None).unwrap();
    fs::write(dir.path().join("w-00000.safetensors"), &bytes).unwrap();
    let v1 = format!(
        r#"{{"format":"lcm-latent-cache","format_version":1,"writer":"w","shards":[{{"file":"w-00000.safetensors","bytes":{},"crc32":{},"keys":["k"]}}]}}"#,
        bytes.len(),
        crc32fast::hash(&bytes)
    );
    fs::write(dir.path().join("index.w.json"), v1).unwrap();
    assert_eq!(CacheReader::open(dir.path(), true).unwrap().get("k").unwrap(), &data[..]);
    // No recorded mtime: the cheap check reads the CRC, and a repair records the mtime for the next time.
    let report = check(dir.path(), CheckOptions { full: false, repair: true, remove_orphans: false }).unwrap();
    assert!(report.problems.is_empty());
    assert!(read_index(dir.path(), "w").unwrap().shards[0].mtime_ns.is_some());
}

#[test]
fn cheap_check_trusts_size_and_mtime_and_full_check_reads_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "w", 1).unwrap();
    put_f32(&mut w, "x", &[1.0; 64]);
    w.close().unwrap();
    let shard = dir.path().join("w-00000.safetensors");
    let mtime = fs::metadata(&shard).unwrap().modified().unwrap();
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let mut f = fs::OpenOptions::new().write(true).open(&shard).unwrap();
    f.write_all(&bytes).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    // Same size, mtime put back: by design only a full check can tell.
    assert!(check(dir.path(), CheckOptions::default()).unwrap().problems.is_empty());
    assert_eq!(check(dir.path(), CheckOptions { full: true, ..CheckOptions::default() }).unwrap().problems.len(), 1);
    // A changed mtime makes even the cheap check read the CRC.
    let f = fs::OpenOptions::new().write(true).open(&shard).unwrap();
    f.set_modified(mtime + std::time::Duration::from_secs(5)).unwrap();
    drop(f);
    assert_eq!(check(dir.path(), CheckOptions::default()).unwrap().problems.len(), 1);
}

#[test]
fn a_second_writer_of_one_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = CacheWriter::open(dir.path(), "rank0", 1).unwrap();
    let err = CacheWriter::open(dir.path(), "rank0", 1).err().unwrap();
    assert!(matches!(err, CacheError::WriterBusy { .. }));
    assert!(err.to_string().contains("writer `rank0`"), "{err}");
    CacheWriter::open(dir.path(), "rank1", 1).unwrap();
    first.close().unwrap();
    assert!(first.put("a", Dtype::U8, vec![1], vec![0]).is_err());
    CacheWriter::open(dir.path(), "rank0", 1).unwrap();
}

#[test]
fn gather_checks_dtype_and_shape_of_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
    w.put("a", Dtype::F32, vec![4, 2, 3], vec![0; 96]).unwrap();
    w.put("b", Dtype::F32, vec![4, 3, 2], vec![0; 96]).unwrap();
    w.put("c", Dtype::I32, vec![4, 2, 3], vec![0; 96]).unwrap();
    w.put("d", Dtype::F32, vec![4, 2, 3], vec![1; 96]).unwrap();
    w.close().unwrap();
    let r = CacheReader::open(dir.path(), true).unwrap();
    let mut out = vec![0u8; 192];
    for other in ["b", "c"] {
        let err = r.gather(&["a".into(), other.into()], &mut out).unwrap_err().to_string();
        assert!(err.contains(&format!("key `{other}`")) && err.contains("one dtype and shape"), "{err}");
    }
    r.gather(&["d".into(), "a".into()], &mut out).unwrap();
    assert_eq!((&out[..96], &out[96..]), (&[1u8; 96][..], &[0u8; 96][..]));
}

fn one_shard_cache() -> (tempfile::TempDir, PathBuf, CacheReader) {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
    put_f32(&mut w, "x", &[1.0; 4096]);
    put_f32(&mut w, "y", &[2.0; 4096]);
    w.close().unwrap();
    let shard = dir.path().join("w-00000.safetensors");
    let reader = CacheReader::open(dir.path(), true).unwrap();
    assert_eq!(reader.get("x").unwrap()[..4], 1.0f32.to_le_bytes());
    (dir, shard, reader)
}

fn assert_refused(reader: &CacheReader, what: &str) {
    for err in [reader.get("y").err(), reader.locate("y").err(), reader.get_private("y").err(), reader.gather(&["y".into()], &mut [0; 16384]).err()] {
        let err = err.expect("a changed shard is never served").to_string();
        assert!(err.contains(what), "{err}");
    }
}

#[test]
fn a_shard_truncated_after_opening_is_refused() {
    let (_dir, shard, reader) = one_shard_cache();
    let len = fs::metadata(&shard).unwrap().len();
    fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len / 2).unwrap();
    assert_refused(&reader, "changed on disk");
}

#[test]
fn a_shard_rewritten_in_place_with_the_same_size_is_refused() {
    let (_dir, shard, reader) = one_shard_cache();
    let before = fs::metadata(&shard).unwrap();
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    // Rewrite until the filesystem's clock moves the times (their granularity can be coarser than one write).
    loop {
        fs::OpenOptions::new().write(true).open(&shard).unwrap().write_all(&bytes).unwrap();
        let now = fs::metadata(&shard).unwrap();
        if Stamp::of(&now) != Stamp::of(&before) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_refused(&reader, "changed on disk");
}

#[test]
fn a_shard_replaced_or_deleted_after_opening_is_refused() {
    let (dir, shard, reader) = one_shard_cache();
    let copy = dir.path().join("copy");
    fs::copy(&shard, &copy).unwrap();
    fs::rename(&copy, &shard).unwrap();
    assert_refused(&reader, "changed on disk");
    fs::remove_file(&shard).unwrap();
    assert_refused(&reader, "deleted");
}

#[test]
fn private_views_are_copy_on_write() {
    let (_dir, shard, reader) = one_shard_cache();
    let before = fs::read(&shard).unwrap();
    let (mut view, entry) = reader.get_private("x").unwrap();
    assert_eq!((entry.len, &view[..4]), (16384, &1.0f32.to_le_bytes()[..]));
    view.fill(9);
    assert_eq!(reader.get_private("x").unwrap().0[..4], 1.0f32.to_le_bytes());
    assert_eq!(reader.get("x").unwrap()[..4], 1.0f32.to_le_bytes());
    assert_eq!(fs::read(&shard).unwrap(), before);
}

#[test]
fn empty_tensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
    w.put("e", Dtype::F32, vec![0, 3], vec![]).unwrap();
    w.close().unwrap();
    let r = CacheReader::open(dir.path(), true).unwrap();
    assert_eq!(r.get("e").unwrap(), b"");
    assert_eq!(r.get_private("e").unwrap().0.len(), 0);
    r.gather(&["e".into(), "e".into()], &mut []).unwrap();
}
