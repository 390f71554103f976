//! Sharded latent cache: safetensors shards plus a journaled index per writer, read by mmap.
//!
//! Layout of a cache directory:
//! - `<writer>-<n:05>.safetensors`: a standard safetensors file written by the `safetensors` crate, sealed once and
//!   never modified;
//! - `index.<writer>.json`: the snapshot `{"format", "format_version", "writer", "shards": [{"file", "bytes",
//!   "crc32", "mtime_ns", "keys"}]}`;
//! - `index.<writer>.journal`: shard records committed since the last compaction, one JSON object per line;
//! - `index.<writer>.lock`: `flock`ed by the one process writing as `<writer>`.
//!
//! A commit writes the shard to a temp file, fsyncs it, renames it into place, fsyncs the directory, then appends
//! one line to the journal and fsyncs that: a killed writer leaves only whole shards, a shard is visible once its
//! line is complete, and a commit costs the same on the ten-thousandth shard as on the first. Opening and closing
//! a writer compacts its journal into the snapshot.
//!
//! Readers never trust a name from an index: it must be a shard name of that index's writer (so it stays in the
//! directory) and a regular file, not a link. Before anything is served, the shard's size, mtime, ctime and inode
//! are compared with what they were when the reader opened it.
mod index;
mod shard;
mod verify;

pub use index::{
    is_shard_of, lock_path, parse_index, parse_shard_name, read_index, read_indexes, shard_name, valid_writer, writers, Index,
    ShardRecord, Stamp, WriterLock, FORMAT_NAME, FORMAT_VERSION,
};
pub use shard::{ShardFault, TensorSpan};
pub use verify::{check, verify, Action, CheckOptions, Problem, Report};

use crate::error::{CacheError, Result};
use memmap2::{Mmap, MmapMut, MmapOptions};
use rayon::prelude::*;
use shard::{open_shard, Pending};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// Appends tensors into size-bounded shards of one writer. Holds the writer's lock from `open` to `close` (or
/// drop): a second writer of the same name, in this process or another, is refused.
pub struct CacheWriter {
    dir: PathBuf,
    writer: String,
    shard_bytes: usize,
    index: Index,
    lock: Option<WriterLock>,
    /// Whether the journal holds records the snapshot lacks.
    journaled: bool,
    /// Keys sealed by any writer of the directory, plus those pending here.
    known: HashSet<String>,
    pending: Vec<Pending>,
    pending_bytes: usize,
}

impl CacheWriter {
    /// Opens (or creates) `dir` for writer `writer`, resuming after its last sealed shard. `shard_bytes` is the
    /// size at which a shard is sealed. Fails with [`CacheError::WriterBusy`] when the writer name is taken.
    pub fn open(dir: &Path, writer: &str, shard_bytes: usize) -> Result<Self> {
        index::check_writer(writer)?;
        fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        let lock = WriterLock::acquire(dir, writer)?;
        let index = read_index(dir, writer)?;
        let exists = |name: String| dir.join(name).symlink_metadata().is_ok();
        if exists(index::journal_name(writer)) || !exists(index::snapshot_name(writer)) {
            index::compact(dir, &index)?;
        }
        let mut known = HashSet::new();
        for other in read_indexes(dir)? {
            known.extend(other.shards.into_iter().flat_map(|s| s.keys));
        }
        Ok(CacheWriter {
            dir: dir.into(),
            writer: writer.into(),
            shard_bytes: shard_bytes.max(1),
            index,
            lock: Some(lock),
            journaled: false,
            known,
            pending: Vec::new(),
            pending_bytes: 0,
        })
    }

    fn check_open(&self) -> Result<()> {
        match self.lock {
            Some(_) => Ok(()),
            None => Err(CacheError::config("writer", format!("writer `{}` of `{}` is closed", self.writer, self.dir.display()))),
        }
    }

    /// Whether `key` is already sealed in the directory or pending in this writer.
    pub fn contains(&self, key: &str) -> bool {
        self.known.contains(key)
    }

    /// Queues one tensor; seals a shard when the pending bytes reach the shard size.
    pub fn put(&mut self, key: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<()> {
        self.check_open()?;
        if key.is_empty() || key == "__metadata__" {
            return Err(CacheError::config("key", format!("`{key}` is reserved")));
        }
        let expected = shape.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d));
        if expected != Some(data.len()) {
            return Err(CacheError::config("shape", format!("{shape:?} of {} does not match {} bytes for key `{key}`", dtype.name(), data.len())));
        }
        if !self.known.insert(key.to_string()) {
            return Err(CacheError::DuplicateKey { key: key.into() });
        }
        self.pending_bytes = self.pending_bytes.saturating_add(data.len());
        self.pending.push(Pending { key: key.into(), dtype, shape, data });
        if self.pending_bytes >= self.shard_bytes {
            self.commit()?;
        }
        Ok(())
    }

    /// Seals the pending tensors into a shard and appends it to the journal. No-op when nothing is pending.
    pub fn commit(&mut self) -> Result<()> {
        self.check_open()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        // Numbers are never reused, and no existing name (an orphan, a link) is ever written over.
        let mut n = self.index.shards.len() as u64;
        while self.index.shards.iter().any(|s| s.file == shard_name(&self.writer, n))
            || self.dir.join(shard_name(&self.writer, n)).symlink_metadata().is_ok()
        {
            n += 1;
        }
        let file = shard_name(&self.writer, n);
        let bytes = shard::serialize(&self.dir.join(&file), &self.pending)?;
        let stamp = index::write_atomic(&self.dir, &file, &bytes)?;
        let record = ShardRecord {
            file,
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
            mtime_ns: Some(stamp.mtime_ns),
            keys: self.pending.iter().map(|e| e.key.clone()).collect(),
        };
        index::append_journal(&self.dir, &self.writer, &record)?;
        self.index.shards.push(record);
        self.journaled = true;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Commits, compacts the journal into the snapshot and releases the lock. Later calls do nothing.
    pub fn close(&mut self) -> Result<()> {
        if self.lock.is_none() {
            return Ok(());
        }
        self.commit()?;
        if self.journaled {
            index::compact(&self.dir, &self.index)?;
            self.journaled = false;
        }
        self.lock = None;
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
    /// File identity and times when the reader opened it; nothing is served once they differ.
    stamp: Option<Stamp>,
    map: Option<Mmap>,
    fault: Option<ShardFault>,
    crc_checked: OnceLock<std::result::Result<(), String>>,
}

impl Shard {
    /// Opens the shard of `record` and reads its entries; a shard that fails is kept with its fault, and its keys
    /// still resolve (to an empty entry), so that asking for them names the shard.
    fn open(dir: &Path, writer: &str, record: ShardRecord, shard_no: usize) -> (Shard, Vec<(String, Entry)>) {
        let path = dir.join(&record.file);
        let mut shard = Shard { path, record, stamp: None, map: None, fault: None, crc_checked: OnceLock::new() };
        let entries = match shard.map_and_parse(writer, shard_no) {
            Ok(found) => found,
            Err(fault) => {
                shard.fault = Some(fault);
                let broken = Entry { shard: shard_no, offset: 0, len: 0, dtype: Dtype::U8, shape: vec![0] };
                shard.record.keys.iter().map(|key| (key.clone(), broken.clone())).collect()
            }
        };
        (shard, entries)
    }

    fn map_and_parse(&mut self, writer: &str, shard_no: usize) -> std::result::Result<Vec<(String, Entry)>, ShardFault> {
        if !is_shard_of(&self.record.file, writer) {
            return Err(ShardFault::Foreign(format!(
                "`{}` is not a shard name of writer `{writer}` (expected {writer}-NNNNN.safetensors)",
                self.record.file
            )));
        }
        let (file, stamp) = open_shard(&self.path)?;
        if stamp.size != self.record.bytes {
            return Err(ShardFault::Corrupt(format!("size is {} bytes, index says {}", stamp.size, self.record.bytes)));
        }
        let spans = shard::read_header(&file, stamp.size, &self.record.keys)?;
        // SAFETY: the map is only read after `current_stamp` confirmed the file is unchanged, and never written.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ShardFault::Unreadable(format!("cannot map: {e}")))?;
        self.stamp = Some(stamp);
        self.map = Some(map);
        Ok(spans.into_iter().map(|s| (s.key, Entry { shard: shard_no, offset: s.offset, len: s.len, dtype: s.dtype, shape: s.shape })).collect())
    }

    fn corrupt(&self, reason: impl Into<String>) -> CacheError {
        CacheError::CorruptShard { path: self.path.clone(), reason: reason.into() }
    }

    /// Fails unless the file at the shard's path is still the one mapped, with the same size and times.
    fn check_unchanged(&self, now: std::io::Result<Stamp>) -> Result<()> {
        let changed = "changed on disk since the cache was opened; reopen the cache (shards are never rewritten in place)";
        match now {
            Ok(now) if Some(now) == self.stamp => Ok(()),
            Ok(_) => Err(self.corrupt(changed)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.corrupt("deleted since the cache was opened")),
            Err(e) => Err(CacheError::io(&self.path, e)),
        }
    }
}

/// Cache keys to `T`, with a fast non-cryptographic hash: the keys come from the cache's own index.
type KeyMap<T> = HashMap<String, T, foldhash::fast::RandomState>;

/// Read side: every sealed shard of every writer of a directory, memory-mapped.
pub struct CacheReader {
    shards: Vec<Shard>,
    entries: KeyMap<Entry>,
    verify: bool,
}

impl CacheReader {
    /// Opens `dir`. With `verify`, each shard's CRC-32 is checked on its first use.
    pub fn open(dir: &Path, verify: bool) -> Result<Self> {
        let records: Vec<(String, ShardRecord)> =
            read_indexes(dir)?.into_iter().flat_map(|index| index.shards.into_iter().map(move |r| (index.writer.clone(), r))).collect();
        // Shards' headers are read and parsed in parallel (on a pool of this process's own: a forked child, such as
        // a DataLoader worker or a build's rank, has no threads in the pool it inherited); their entries are merged
        // in index order, so that a key stored twice resolves to its last shard, as a sequential read would.
        let opened: Vec<(Shard, Vec<(String, Entry)>)> = crate::with_threads(None, || {
            records.into_par_iter().enumerate().map(|(shard_no, (writer, record))| Shard::open(dir, &writer, record, shard_no)).collect()
        })?;
        let mut entries = KeyMap::with_capacity_and_hasher(opened.iter().map(|(_, e)| e.len()).sum(), Default::default());
        let mut shards = Vec::with_capacity(opened.len());
        for (shard, found) in opened {
            entries.extend(found);
            shards.push(shard);
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

    fn shard(&self, shard: usize) -> Result<&Shard> {
        self.shards
            .get(shard)
            .ok_or_else(|| CacheError::config("shard", format!("shard {shard} out of range (the cache has {})", self.shards.len())))
    }

    /// The shard, once it opened cleanly, is unchanged on disk (by path) and, with `verify`, passed its CRC.
    fn check(&self, shard: usize) -> Result<&Shard> {
        let s = self.shard(shard)?;
        if let Some(fault) = &s.fault {
            return Err(s.corrupt(fault.reason()));
        }
        s.check_unchanged(fs::symlink_metadata(&s.path).map(|m| Stamp::of(&m)))?;
        if self.verify {
            let verdict = s.crc_checked.get_or_init(|| {
                let (file, stamp) = open_shard(&s.path).map_err(|f| f.reason().to_string())?;
                if Some(stamp) != s.stamp {
                    return Err("changed on disk since the cache was opened; reopen the cache".into());
                }
                let crc = shard::streaming_crc(&file, stamp.size).map_err(|f| f.reason().to_string())?;
                if crc == s.record.crc32 { Ok(()) } else { Err(format!("crc32 is {crc:#010x}, index says {:#010x}", s.record.crc32)) }
            });
            verdict.clone().map_err(|r| s.corrupt(r))?;
        }
        Ok(s)
    }

    /// An open file of the shard, checked to be the very file the reader mapped.
    fn open_checked(&self, shard: usize) -> Result<fs::File> {
        let s = self.check(shard)?;
        let (file, stamp) = open_shard(&s.path).map_err(|f| s.corrupt(f.reason()))?;
        s.check_unchanged(Ok(stamp))?;
        Ok(file)
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries.get(key).ok_or_else(|| CacheError::KeyNotFound { key: key.into() })
    }

    /// Location of `key`, after its shard passed its checks.
    pub fn locate(&self, key: &str) -> Result<&Entry> {
        let entry = self.entry(key)?;
        self.check(entry.shard)?;
        Ok(entry)
    }

    /// The mapped bytes of shard `shard` (checked first); lives as long as the reader.
    pub fn shard_data(&self, shard: usize) -> Result<&[u8]> {
        let s = self.check(shard)?;
        s.map.as_deref().ok_or_else(|| s.corrupt("not mapped"))
    }

    /// Bytes of `key`, zero-copy from the shared read-only map.
    pub fn get(&self, key: &str) -> Result<&[u8]> {
        let e = self.entry(key)?;
        let data = self.shard_data(e.shard)?;
        let end = e.offset.checked_add(e.len).ok_or_else(|| self.shards[e.shard].corrupt("entry past the end"))?;
        data.get(e.offset..end).ok_or_else(|| self.shards[e.shard].corrupt(format!("entry `{key}` past the end")))
    }

    /// `key`'s bytes in a private copy-on-write mapping of their own: zero-copy until written, and a write changes
    /// neither the file nor what any other call returns. Empty tensors give an empty map.
    pub fn get_private(&self, key: &str) -> Result<(MmapMut, &Entry)> {
        let e = self.entry(key)?;
        let file = self.open_checked(e.shard)?;
        if e.len == 0 {
            return Ok((MmapMut::map_anon(0).map_err(|err| CacheError::io(&self.shards[e.shard].path, err))?, e));
        }
        // SAFETY: a private mapping of a file just checked to be the unchanged shard; writes stay in this process.
        let map = unsafe { MmapOptions::new().offset(e.offset as u64).len(e.len).map_copy(&file) }.map_err(|err| {
            CacheError::io(&self.shards[e.shard].path, std::io::Error::new(err.kind(), format!("cannot map a private view: {err}")))
        })?;
        Ok((map, e))
    }

    /// Copies the tensors of `keys`, all of one dtype and shape, into `out` (their total size), in parallel. Reads
    /// with `pread` from files checked to be unchanged: a shard truncated meanwhile gives an error, never SIGBUS.
    pub fn gather(&self, keys: &[String], out: &mut [u8]) -> Result<()> {
        let Some(first_key) = keys.first() else {
            return if out.is_empty() { Ok(()) } else { Err(CacheError::config("keys", "no keys for a non-empty batch")) };
        };
        let first = self.entry(first_key)?;
        let entries: Vec<&Entry> = keys.iter().map(|k| self.entry(k)).collect::<Result<_>>()?;
        let mut files = HashMap::new();
        for (key, e) in keys.iter().zip(&entries) {
            if let std::collections::hash_map::Entry::Vacant(slot) = files.entry(e.shard) {
                slot.insert(self.open_checked(e.shard)?);
            }
            if e.dtype != first.dtype || e.shape != first.shape {
                return Err(CacheError::BatchMismatch {
                    reason: format!(
                        "key `{key}` is {} {:?}, but key `{first_key}` is {} {:?}: a batch needs one dtype and shape",
                        e.dtype.name(),
                        e.shape,
                        first.dtype.name(),
                        first.shape
                    ),
                });
            }
        }
        let len = first.len;
        if len.checked_mul(keys.len()) != Some(out.len()) {
            return Err(CacheError::config("keys", format!("{} keys of {len} bytes do not fill a batch of {} bytes", keys.len(), out.len())));
        }
        if len == 0 {
            return Ok(());
        }
        let read = |(o, e): (&mut [u8], &&Entry)| -> Result<()> {
            let s = &self.shards[e.shard];
            files[&e.shard].read_exact_at(o, e.offset as u64).map_err(|err| s.corrupt(format!("cannot read: {err}")))
        };
        // One worker would only add a hand-off to another thread: copy on the caller's.
        if crate::global_pool_usable() && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(len).zip(entries.par_iter()).try_for_each(read)
        } else {
            out.chunks_mut(len).zip(entries.iter()).try_for_each(read)
        }
    }
}

#[cfg(test)]
mod tests;
