//! Sharded latent cache: safetensors shards plus one JSON index per writer, written atomically, read by mmap.
//!
//! Layout of a cache directory:
//! - `<writer>-<n:05>.safetensors`: a standard safetensors file (header padded so tensor data starts at a
//!   64-byte boundary), sealed once and never modified;
//! - `index.<writer>.json`: `{"format", "format_version", "writer", "shards": [{"file", "bytes", "crc32",
//!   "keys"}]}`, listing only sealed shards.
//!
//! Writes go to a temp file, are fsynced, renamed into place, and the directory is fsynced: a killed writer
//! leaves only whole shards, and a shard is visible only once its index entry is committed.
use crate::error::{CacheError, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Name written into every index and shard header.
pub const FORMAT_NAME: &str = "lcm-latent-cache";
/// Bumped on any incompatible change of the layout.
pub const FORMAT_VERSION: u32 = 1;
const DATA_ALIGN: usize = 64;

/// One sealed shard as listed in an index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardRecord {
    /// File name inside the cache directory.
    pub file: String,
    /// File size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
    /// Keys stored in the shard.
    pub keys: Vec<String>,
}

/// One writer's index file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Index {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Writer name (e.g. a rank).
    pub writer: String,
    /// Sealed shards, in write order.
    pub shards: Vec<ShardRecord>,
}

/// Element type of a stored tensor (safetensors names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// `BOOL`.
    Bool,
    /// `U8`.
    U8,
    /// `I8`.
    I8,
    /// `I16`.
    I16,
    /// `I32`.
    I32,
    /// `I64`.
    I64,
    /// `F16`.
    F16,
    /// `BF16`.
    BF16,
    /// `F32`.
    F32,
    /// `F64`.
    F64,
}

impl Dtype {
    const ALL: [(Dtype, &'static str, usize); 10] = [
        (Dtype::Bool, "BOOL", 1),
        (Dtype::U8, "U8", 1),
        (Dtype::I8, "I8", 1),
        (Dtype::I16, "I16", 2),
        (Dtype::I32, "I32", 4),
        (Dtype::I64, "I64", 8),
        (Dtype::F16, "F16", 2),
        (Dtype::BF16, "BF16", 2),
        (Dtype::F32, "F32", 4),
        (Dtype::F64, "F64", 8),
    ];

    /// Parses a safetensors dtype name.
    pub fn parse(name: &str) -> Result<Dtype> {
        Self::ALL.iter().find(|d| d.1 == name).map(|d| d.0).ok_or_else(|| {
            CacheError::config("dtype", format!("`{name}` is not one of BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64"))
        })
    }

    /// The safetensors name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|d| d.0 == self).map_or("U8", |d| d.1)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        Self::ALL.iter().find(|d| d.0 == self).map_or(1, |d| d.2)
    }
}

/// Where a key's bytes live.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Shard number in [`CacheReader::shard_paths`].
    pub shard: usize,
    /// Byte offset inside the shard file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
struct TensorHeader {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

fn index_path(dir: &Path, writer: &str) -> PathBuf {
    dir.join(format!("index.{writer}.json"))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| CacheError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| CacheError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| CacheError::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CacheError::io(dir, e))
}

fn read_index(path: &Path) -> Result<Index> {
    let text = fs::read_to_string(path).map_err(|e| CacheError::io(path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| CacheError::format(path, e))?;
    if index.format != FORMAT_NAME {
        return Err(CacheError::format(path, format!("format is `{}`, expected `{FORMAT_NAME}`", index.format)));
    }
    if index.format_version != FORMAT_VERSION {
        return Err(CacheError::format(
            path,
            format!("format_version {} is not supported (this build reads {FORMAT_VERSION})", index.format_version),
        ));
    }
    Ok(index)
}

/// All index files of a cache directory, sorted by name.
pub fn read_indexes(dir: &Path) -> Result<Vec<(PathBuf, Index)>> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| CacheError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("index.") && name.ends_with(".json")
        })
        .collect();
    paths.sort();
    paths.into_iter().map(|p| read_index(&p).map(|i| (p, i))).collect()
}

/// Builds a safetensors file image of `entries` (key, dtype, shape, bytes).
fn shard_bytes(entries: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), FORMAT_NAME.into());
    meta.insert("format_version".into(), FORMAT_VERSION.to_string().into());
    header.insert("__metadata__".into(), meta.into());
    let mut offset = 0usize;
    for (key, dtype, shape, data) in entries {
        let h = TensorHeader { dtype: dtype.name().into(), shape: shape.clone(), data_offsets: [offset, offset + data.len()] };
        header.insert(key.clone(), serde_json::to_value(h).expect("plain struct"));
        offset += data.len();
    }
    let mut json = serde_json::to_vec(&header).expect("plain map");
    while (8 + json.len()) % DATA_ALIGN != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    for e in entries {
        out.extend(&e.3);
    }
    out
}

/// Parses a shard's safetensors header into entries (offsets made absolute).
fn parse_shard(path: &Path, bytes: &[u8], shard: usize) -> Result<Vec<(String, Entry)>> {
    let bad = |why: String| CacheError::CorruptShard { path: path.to_path_buf(), reason: why };
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize).ok_or_else(|| bad("shorter than its header".into()))?;
    let json = bytes.get(8..8usize.saturating_add(n)).ok_or_else(|| bad("header length past end of file".into()))?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("unreadable header: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(header.len());
    for (key, value) in header {
        if key == "__metadata__" {
            continue;
        }
        let t: TensorHeader = serde_json::from_value(value).map_err(|e| bad(format!("entry `{key}`: {e}")))?;
        let dtype = Dtype::parse(&t.dtype).map_err(|e| bad(e.to_string()))?;
        let [s, e] = t.data_offsets;
        let expected = t.shape.iter().product::<usize>() * dtype.size();
        if e < s || e - s != expected || data_start + e > bytes.len() {
            return Err(bad(format!("entry `{key}` has inconsistent offsets")));
        }
        out.push((key, Entry { shard, offset: data_start + s, len: e - s, dtype, shape: t.shape }));
    }
    Ok(out)
}

/// Appends tensors into size-bounded shards of one writer.
pub struct CacheWriter {
    dir: PathBuf,
    writer: String,
    shard_bytes: usize,
    index: Index,
    /// Keys sealed by any writer of the directory, plus those pending here.
    known: HashSet<String>,
    pending: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    pending_bytes: usize,
}

impl CacheWriter {
    /// Opens (or creates) `dir` for writer `writer`, resuming after its last sealed shard. `shard_bytes` is the
    /// size at which a shard is sealed.
    pub fn open(dir: &Path, writer: &str, shard_bytes: usize) -> Result<Self> {
        if writer.is_empty() || !writer.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(CacheError::config("writer", format!("`{writer}` must be non-empty ASCII letters, digits, `_` or `-`")));
        }
        fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        let mut known = HashSet::new();
        let mut own = None;
        for (path, index) in read_indexes(dir)? {
            known.extend(index.shards.iter().flat_map(|s| s.keys.iter().cloned()));
            if index.writer == writer && path == index_path(dir, writer) {
                own = Some(index);
            }
        }
        let index = own.unwrap_or(Index {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            writer: writer.into(),
            shards: Vec::new(),
        });
        Ok(CacheWriter { dir: dir.into(), writer: writer.into(), shard_bytes: shard_bytes.max(1), index, known, pending: Vec::new(), pending_bytes: 0 })
    }

    /// Whether `key` is already sealed in the directory or pending in this writer.
    pub fn contains(&self, key: &str) -> bool {
        self.known.contains(key)
    }

    /// Queues one tensor; seals a shard when the pending bytes reach the shard size.
    pub fn put(&mut self, key: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<()> {
        if key.is_empty() || key == "__metadata__" {
            return Err(CacheError::config("key", format!("`{key}` is reserved")));
        }
        if shape.iter().product::<usize>() * dtype.size() != data.len() {
            return Err(CacheError::config("shape", format!("{shape:?} of {} does not match {} bytes for key `{key}`", dtype.name(), data.len())));
        }
        if !self.known.insert(key.to_string()) {
            return Err(CacheError::DuplicateKey { key: key.into() });
        }
        self.pending_bytes += data.len();
        self.pending.push((key.into(), dtype, shape, data));
        if self.pending_bytes >= self.shard_bytes {
            self.commit()?;
        }
        Ok(())
    }

    /// Seals the pending tensors into a shard and commits it to the index. No-op when nothing is pending.
    pub fn commit(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Numbers are never reused: after a repair the dropped shard's successor may still exist.
        let mut n = self.index.shards.len();
        let name = |n: usize| format!("{}-{:05}.safetensors", self.writer, n);
        while self.index.shards.iter().any(|s| s.file == name(n)) || self.dir.join(name(n)).exists() {
            n += 1;
        }
        let file = name(n);
        let bytes = shard_bytes(&self.pending);
        write_atomic(&self.dir.join(&file), &bytes)?;
        self.index.shards.push(ShardRecord {
            file,
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
            keys: self.pending.iter().map(|e| e.0.clone()).collect(),
        });
        let json = serde_json::to_vec_pretty(&self.index).expect("plain struct");
        write_atomic(&index_path(&self.dir, &self.writer), &json)?;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Number of shards sealed by this writer.
    pub fn shard_count(&self) -> usize {
        self.index.shards.len()
    }
}

struct Shard {
    path: PathBuf,
    record: ShardRecord,
    map: Option<Mmap>,
    open_error: Option<String>,
    checked: OnceLock<std::result::Result<(), String>>,
}

/// Read side: every sealed shard of every writer of a directory, memory-mapped.
pub struct CacheReader {
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    verify: bool,
}

impl CacheReader {
    /// Opens `dir`. With `verify`, each shard's size and CRC-32 are checked on its first use.
    pub fn open(dir: &Path, verify: bool) -> Result<Self> {
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for (_, index) in read_indexes(dir)? {
            for record in index.shards {
                let path = dir.join(&record.file);
                let shard_no = shards.len();
                let (map, open_error) = match File::open(&path) {
                    // SAFETY: shards are sealed (written once, then renamed into place) and never modified in place;
                    // a file truncated by someone else would be caught by the size check before use.
                    Ok(f) => match unsafe { Mmap::map(&f) } {
                        Ok(m) => (Some(m), None),
                        Err(e) => (None, Some(format!("cannot map: {e}"))),
                    },
                    Err(e) => (None, Some(format!("cannot open: {e}"))),
                };
                let mut open_error = open_error;
                if let Some(m) = &map {
                    if m.len() as u64 != record.bytes {
                        open_error = Some(format!("size is {} bytes, index says {}", m.len(), record.bytes));
                    } else {
                        match parse_shard(&path, m, shard_no) {
                            Ok(found) => entries.extend(found),
                            Err(e) => open_error = Some(e.to_string()),
                        }
                    }
                }
                if open_error.is_some() {
                    // Keys of a broken shard still resolve, so that asking for them reports the shard.
                    for key in &record.keys {
                        entries.insert(key.clone(), Entry { shard: shard_no, offset: 0, len: 0, dtype: Dtype::U8, shape: vec![0] });
                    }
                }
                shards.push(Shard { path, record, map, open_error, checked: OnceLock::new() });
            }
        }
        Ok(CacheReader { shards, entries, verify })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache has no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` is stored (its shard may still fail verification).
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.entries.keys().cloned().collect();
        k.sort();
        k
    }

    /// Paths of all shards, indexed by [`Entry::shard`].
    pub fn shard_paths(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// Number of shards; shard numbers run from 0 to this, exclusive.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn check(&self, shard: usize) -> Result<&Shard> {
        let s = self
            .shards
            .get(shard)
            .ok_or_else(|| CacheError::config("shard", format!("shard {shard} out of range (the cache has {})", self.shards.len())))?;
        let bad = |reason: String| CacheError::CorruptShard { path: s.path.clone(), reason };
        if let Some(e) = &s.open_error {
            return Err(bad(e.clone()));
        }
        if self.verify {
            let map = s.map.as_ref().expect("mapped when no open error");
            let verdict = s.checked.get_or_init(|| {
                let crc = crc32fast::hash(map);
                if crc == s.record.crc32 { Ok(()) } else { Err(format!("crc32 is {crc:#010x}, index says {:#010x}", s.record.crc32)) }
            });
            verdict.clone().map_err(bad)?;
        }
        Ok(s)
    }

    /// Location of `key`, after its shard passed verification.
    pub fn locate(&self, key: &str) -> Result<&Entry> {
        let entry = self.entries.get(key).ok_or_else(|| CacheError::KeyNotFound { key: key.into() })?;
        self.check(entry.shard)?;
        Ok(entry)
    }

    /// The mapped bytes of shard `shard` (verified first); lives as long as the reader.
    pub fn shard_data(&self, shard: usize) -> Result<&[u8]> {
        Ok(self.check(shard)?.map.as_deref().expect("mapped when no open error"))
    }

    /// Bytes of `key`.
    pub fn get(&self, key: &str) -> Result<&[u8]> {
        let e = self.entries.get(key).ok_or_else(|| CacheError::KeyNotFound { key: key.into() })?;
        let map = self.check(e.shard)?.map.as_deref().expect("mapped when no open error");
        Ok(&map[e.offset..e.offset + e.len])
    }

    /// Copies the tensors of `keys` (all of one byte size) into `out`, in parallel.
    pub fn gather(&self, keys: &[String], out: &mut [u8]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let len = out.len() / keys.len();
        let sources: Vec<&[u8]> = keys.iter().map(|k| self.get(k)).collect::<Result<_>>()?;
        if let Some((k, s)) = keys.iter().zip(&sources).find(|(_, s)| s.len() != len || len * keys.len() != out.len()) {
            return Err(CacheError::config("keys", format!("key `{k}` has {} bytes, the batch slot has {len}", s.len())));
        }
        // One worker would only add a hand-off to another thread: copy on the caller's.
        if crate::global_pool_usable() && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(len.max(1)).zip(sources.par_iter()).for_each(|(o, s)| o.copy_from_slice(s));
        } else {
            out.chunks_mut(len.max(1)).zip(&sources).for_each(|(o, s)| o.copy_from_slice(s));
        }
        Ok(())
    }
}

/// Checks every shard of `dir` (presence, size, CRC-32, header); returns (shard path, reason) for each failure.
/// With `repair`, failed shards are deleted and dropped from their index, so that a rebuild re-encodes their keys.
pub fn verify(dir: &Path, repair: bool) -> Result<Vec<(PathBuf, String)>> {
    let mut failures = Vec::new();
    for (index_file, mut index) in read_indexes(dir)? {
        let verdicts: Vec<Option<String>> = index
            .shards
            .par_iter()
            .enumerate()
            .map(|(i, record)| {
                let path = dir.join(&record.file);
                let bytes = match fs::read(&path) {
                    Ok(b) => b,
                    Err(e) => return Some(format!("cannot read: {e}")),
                };
                if bytes.len() as u64 != record.bytes {
                    return Some(format!("size is {} bytes, index says {}", bytes.len(), record.bytes));
                }
                let crc = crc32fast::hash(&bytes);
                if crc != record.crc32 {
                    return Some(format!("crc32 is {crc:#010x}, index says {:#010x}", record.crc32));
                }
                parse_shard(&path, &bytes, i).err().map(|e| e.to_string())
            })
            .collect();
        let bad: Vec<usize> = verdicts.iter().enumerate().filter(|(_, v)| v.is_some()).map(|(i, _)| i).collect();
        for (i, v) in verdicts.into_iter().enumerate() {
            if let Some(reason) = v {
                failures.push((dir.join(&index.shards[i].file), reason));
            }
        }
        if repair && !bad.is_empty() {
            for &i in &bad {
                let _ = fs::remove_file(dir.join(&index.shards[i].file));
            }
            let mut i = 0;
            index.shards.retain(|_| {
                i += 1;
                !bad.contains(&(i - 1))
            });
            write_atomic(&index_file, &serde_json::to_vec_pretty(&index).expect("plain struct"))?;
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_f32(w: &mut CacheWriter, key: &str, values: &[f32]) {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.put(key, Dtype::F32, vec![values.len()], bytes).unwrap();
    }

    #[test]
    fn round_trip_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CacheWriter::open(dir.path(), "rank0", 16).unwrap();
        put_f32(&mut w, "a", &[1.0, 2.0, 3.0, 4.0]); // 16 bytes: seals shard 0
        put_f32(&mut w, "b", &[5.0]);
        w.commit().unwrap();
        assert_eq!(w.shard_count(), 2);
        let w2 = CacheWriter::open(dir.path(), "rank1", 16).unwrap();
        assert!(w2.contains("a") && w2.contains("b"));
        let r = CacheReader::open(dir.path(), true).unwrap();
        assert_eq!(r.keys(), vec!["a", "b"]);
        assert_eq!(r.get("b").unwrap(), 5.0f32.to_le_bytes());
        let e = r.locate("a").unwrap();
        assert_eq!((e.dtype, e.shape.clone(), e.offset % DATA_ALIGN), (Dtype::F32, vec![4], 0));
        assert!(matches!(r.get("zz"), Err(CacheError::KeyNotFound { .. })));
    }

    #[test]
    fn corrupt_shard_is_reported_never_served_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
        put_f32(&mut w, "x", &[1.0; 8]);
        w.commit().unwrap();
        put_f32(&mut w, "y", &[2.0; 8]);
        w.commit().unwrap();
        let shard = dir.path().join("w-00000.safetensors");
        let mut bytes = fs::read(&shard).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&shard, bytes).unwrap();
        let r = CacheReader::open(dir.path(), true).unwrap();
        let err = r.get("x").unwrap_err();
        assert!(err.to_string().contains("w-00000.safetensors"), "{err}");
        assert!(r.get("y").is_ok());
        let failures = verify(dir.path(), true).unwrap();
        assert_eq!(failures.len(), 1);
        assert!(verify(dir.path(), false).unwrap().is_empty());
        let w = CacheWriter::open(dir.path(), "w", 1 << 20).unwrap();
        assert!(!w.contains("x") && w.contains("y"));
    }

    #[test]
    fn wrong_version_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("index.w.json"), br#"{"format":"lcm-latent-cache","format_version":99,"writer":"w","shards":[]}"#).unwrap();
        let err = CacheReader::open(dir.path(), true).err().unwrap();
        assert!(err.to_string().contains("format_version 99"), "{err}");
    }
}
