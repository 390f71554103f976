//! Per-writer index: a compacted snapshot (`index.<writer>.json`) plus an append-only journal
//! (`index.<writer>.journal`, one shard record per line), file names the cache owns, the writer lock and atomic
//! writes.
use crate::error::{CacheError, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Name written into every index and shard header.
pub const FORMAT_NAME: &str = "lcm-latent-cache";
/// Bumped on any incompatible change of the layout. 2 added the journal: a version-1 reader would miss the shards
/// listed only there, so it must refuse the cache (it does, naming the version).
pub const FORMAT_VERSION: u32 = 2;
/// Oldest snapshot version this build reads (version 1 is version 2 without a journal and without mtimes).
const OLDEST_READABLE: u32 = 1;

/// One sealed shard as listed in an index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardRecord {
    /// File name inside the cache directory (`<writer>-<n:05>.safetensors`).
    pub file: String,
    /// File size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
    /// Modification time (ns since the epoch) when sealed; absent in version-1 indexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    /// Keys stored in the shard.
    pub keys: Vec<String>,
}

/// One writer's index, snapshot and journal merged.
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

impl Index {
    pub(crate) fn empty(writer: &str) -> Self {
        Index { format: FORMAT_NAME.into(), format_version: FORMAT_VERSION, writer: writer.into(), shards: Vec::new() }
    }
}

/// Whether `name` is a writer name: non-empty ASCII letters, digits, `_` or `-`.
pub fn valid_writer(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

pub(crate) fn check_writer(name: &str) -> Result<()> {
    if valid_writer(name) {
        Ok(())
    } else {
        Err(CacheError::config("writer", format!("`{name}` must be non-empty ASCII letters, digits, `_` or `-`")))
    }
}

/// Shard `n` of `writer`.
pub fn shard_name(writer: &str, n: u64) -> String {
    format!("{writer}-{n:05}.safetensors")
}

/// (writer, number) of a file named as the writer names shards; `None` for any other name. Such a name has no
/// `/`, no `..` and is never absolute, so it always stays inside the cache directory.
pub fn parse_shard_name(file: &str) -> Option<(&str, u64)> {
    let (writer, digits) = file.strip_suffix(".safetensors")?.rsplit_once('-')?;
    if digits.len() < 5 || !digits.bytes().all(|c| c.is_ascii_digit()) || !valid_writer(writer) {
        return None;
    }
    Some((writer, digits.parse().ok()?))
}

/// Whether `file` is a shard name of `writer`.
pub fn is_shard_of(file: &str, writer: &str) -> bool {
    parse_shard_name(file).is_some_and(|(w, _)| w == writer)
}

pub(crate) fn snapshot_name(writer: &str) -> String {
    format!("index.{writer}.json")
}

pub(crate) fn journal_name(writer: &str) -> String {
    format!("index.{writer}.journal")
}

fn lock_name(writer: &str) -> String {
    format!("index.{writer}.lock")
}

/// Writer named by an index snapshot or journal file name.
pub(crate) fn writer_of_index_file(name: &str) -> Option<&str> {
    let stem = name.strip_prefix("index.")?;
    let writer = stem.strip_suffix(".json").or_else(|| stem.strip_suffix(".journal"))?;
    valid_writer(writer).then_some(writer)
}

/// The writer whose file `name` is a temp file of (`<own file>.tmp`, or the `<stem>.tmp` of format version 1).
pub(crate) fn writer_of_temp_file(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".tmp")?;
    if let Some((writer, _)) = parse_shard_name(stem) {
        return Some(writer);
    }
    if let Some(writer) = writer_of_index_file(stem) {
        return Some(writer);
    }
    // Version 1 wrote `<writer>-<n>.tmp` and `index.<writer>.tmp`.
    if parse_shard_name(&format!("{stem}.safetensors")).is_some() {
        return stem.rsplit_once('-').map(|(writer, _)| writer);
    }
    stem.strip_prefix("index.").filter(|w| valid_writer(w))
}

/// Size, modification and change times and identity of a file, as `fstat`/`stat` report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch (no user can set it: any write or metadata change moves it).
    pub ctime_ns: i64,
}

impl Stamp {
    pub(crate) fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
            ctime_ns: meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec()),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CacheError::io(dir, e))
}

/// Writes `bytes` as `dir/name` atomically: a fresh temp file (never through a link), fsync, rename, fsync of the
/// directory. Returns the stamp of the written file. Callers hold the writer's lock, so a temp file of the same
/// name can only be a leftover of a killed writer.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<Stamp> {
    let tmp = dir.join(format!("{name}.tmp"));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(CacheError::io(&tmp, e)),
        _ => {}
    }
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| CacheError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| CacheError::io(&tmp, e))?;
    let stamp = Stamp::of(&f.metadata().map_err(|e| CacheError::io(&tmp, e))?);
    drop(f);
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(|e| CacheError::io(&path, e))?;
    sync_dir(dir)?;
    Ok(stamp)
}

fn parse_snapshot(path: &Path, text: &str, writer: &str) -> Result<Index> {
    let index: Index = serde_json::from_str(text).map_err(|e| CacheError::format(path, e))?;
    if index.format != FORMAT_NAME {
        return Err(CacheError::format(path, format!("format is `{}`, expected `{FORMAT_NAME}`", index.format)));
    }
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&index.format_version) {
        return Err(CacheError::format(
            path,
            format!(
                "format_version {} is not supported (this build reads {OLDEST_READABLE} to {FORMAT_VERSION})",
                index.format_version
            ),
        ));
    }
    if index.writer != writer {
        return Err(CacheError::format(path, format!("writer is `{}`, the file name says `{writer}`", index.writer)));
    }
    Ok(index)
}

/// Journal records. A last line without its newline, or unreadable, is a write cut short by a kill and is
/// ignored (its shard becomes an orphan); an unreadable line before the last is an error.
fn parse_journal(path: &Path, text: &str) -> Result<Vec<ShardRecord>> {
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        if line.trim().is_empty() || (last && !complete) {
            continue;
        }
        match serde_json::from_str::<ShardRecord>(line) {
            Ok(r) => records.push(r),
            Err(_) if last => {}
            Err(e) => return Err(CacheError::format(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(records)
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| CacheError::format(path, "not UTF-8 text")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CacheError::io(path, e)),
    }
}

/// Parses a snapshot text and a journal text (either may be absent) into one index; exposed for fuzzing.
pub fn parse_index(dir: &Path, writer: &str, snapshot: Option<&str>, journal: Option<&str>) -> Result<Index> {
    let mut index = match snapshot {
        Some(text) => parse_snapshot(&dir.join(snapshot_name(writer)), text, writer)?,
        None => Index::empty(writer),
    };
    if let Some(text) = journal {
        for record in parse_journal(&dir.join(journal_name(writer)), text)? {
            // A compaction cut short leaves records in both files.
            if !index.shards.iter().any(|s| s.file == record.file) {
                index.shards.push(record);
            }
        }
    }
    Ok(index)
}

/// The index of `writer` in `dir` (empty when it has none). The journal is read before the snapshot: a
/// compaction writes the snapshot before it removes the journal, so every committed record is seen either way.
pub fn read_index(dir: &Path, writer: &str) -> Result<Index> {
    let journal = read_optional(&dir.join(journal_name(writer)))?;
    let snapshot = read_optional(&dir.join(snapshot_name(writer)))?;
    parse_index(dir, writer, snapshot.as_deref(), journal.as_deref())
}

/// Writers with an index in `dir`, sorted.
pub fn writers(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| CacheError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(writer_of_index_file).map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Every index of `dir`, sorted by writer.
pub fn read_indexes(dir: &Path) -> Result<Vec<Index>> {
    writers(dir)?.iter().map(|w| read_index(dir, w)).collect()
}

/// Replaces the snapshot with `index` and removes the journal (caller holds the writer's lock).
pub(crate) fn compact(dir: &Path, index: &Index) -> Result<()> {
    let mut snapshot = index.clone();
    snapshot.format_version = FORMAT_VERSION;
    let json = serde_json::to_vec_pretty(&snapshot).map_err(|e| CacheError::format(&dir.join(snapshot_name(&index.writer)), e))?;
    write_atomic(dir, &snapshot_name(&index.writer), &json)?;
    let journal = dir.join(journal_name(&index.writer));
    match fs::remove_file(&journal) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::io(&journal, e)),
    }
}

/// Appends one record to the writer's journal and fsyncs it (caller holds the writer's lock).
pub(crate) fn append_journal(dir: &Path, writer: &str, record: &ShardRecord) -> Result<()> {
    let path = dir.join(journal_name(writer));
    let mut line = serde_json::to_vec(record).map_err(|e| CacheError::format(&path, e))?;
    line.push(b'\n');
    let existed = path.exists();
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| CacheError::io(&path, e))?;
    f.write_all(&line).and_then(|()| f.sync_data()).map_err(|e| CacheError::io(&path, e))?;
    if !existed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// An exclusive `flock` on `index.<writer>.lock`, held while the value lives (the kernel drops it with the
/// process, so a killed writer never leaves a stale lock).
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Takes the lock of `writer` in `dir` without waiting; `Ok(None)` when another open file description holds it.
    pub fn try_acquire(dir: &Path, writer: &str) -> Result<Option<WriterLock>> {
        let path = dir.join(lock_name(writer));
        // flock needs no write access: a lock file another user created still locks (a repair run as that user).
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                OpenOptions::new().read(true).write(true).create(true).truncate(false).custom_flags(libc::O_NOFOLLOW).open(&path)
            }
            other => other,
        }
        .map_err(|e| CacheError::io(&path, e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(WriterLock { _file: file }));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(CacheError::io(&path, err))
        }
    }

    /// Takes the lock or fails with [`CacheError::WriterBusy`].
    pub fn acquire(dir: &Path, writer: &str) -> Result<WriterLock> {
        WriterLock::try_acquire(dir, writer)?.ok_or_else(|| CacheError::WriterBusy { dir: dir.to_path_buf(), writer: writer.into() })
    }
}

/// Path of `writer`'s lock file (reported in errors).
pub fn lock_path(dir: &Path, writer: &str) -> PathBuf {
    dir.join(lock_name(writer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_are_validated() {
        assert_eq!(parse_shard_name("rank0-00012.safetensors"), Some(("rank0", 12)));
        assert_eq!(parse_shard_name("my-rank-123456.safetensors"), Some(("my-rank", 123456)));
        for bad in ["../victim", "/etc/passwd", "rank0-0001.safetensors", "a/b-00000.safetensors", "..-00000.safetensors",
                    "rank0-00000.safetensors/..", "-00000.safetensors", "rank0-0000x.safetensors", "rank0-00000.bin", ""] {
            assert_eq!(parse_shard_name(bad), None, "{bad}");
        }
        assert!(is_shard_of("w-00000.safetensors", "w") && !is_shard_of("w-00000.safetensors", "v"));
        assert_eq!(writer_of_temp_file("w-00003.safetensors.tmp"), Some("w"));
        assert_eq!(writer_of_temp_file("index.w.json.tmp"), Some("w"));
        assert_eq!(writer_of_temp_file("w-00003.tmp"), Some("w"));
        assert_eq!(writer_of_temp_file("index.w.tmp"), Some("w"));
        assert_eq!(writer_of_temp_file("notes.tmp"), None);
    }

    #[test]
    fn journal_tolerates_only_a_torn_last_line() {
        let dir = Path::new("/c");
        let line = r#"{"file":"w-00000.safetensors","bytes":8,"crc32":1,"keys":["a"]}"#;
        let torn = format!("{line}\n{{\"file\":\"w-0000");
        assert_eq!(parse_index(dir, "w", None, Some(&torn)).unwrap().shards.len(), 1);
        let garbage_last = format!("{line}\nxx\n");
        assert_eq!(parse_index(dir, "w", None, Some(&garbage_last)).unwrap().shards.len(), 1);
        let garbage_middle = format!("xx\n{line}\n");
        let err = parse_index(dir, "w", None, Some(&garbage_middle)).unwrap_err().to_string();
        assert!(err.contains("index.w.journal") && err.contains("line 1"), "{err}");
        let snapshot = format!(r#"{{"format":"lcm-latent-cache","format_version":2,"writer":"w","shards":[{line}]}}"#);
        let merged = parse_index(dir, "w", Some(&snapshot), Some(&format!("{line}\n"))).unwrap();
        assert_eq!(merged.shards.len(), 1, "a record in both files counts once");
    }

    #[test]
    fn snapshot_must_name_its_own_writer() {
        let text = r#"{"format":"lcm-latent-cache","format_version":1,"writer":"other","shards":[]}"#;
        let err = parse_index(Path::new("/c"), "w", Some(text), None).unwrap_err().to_string();
        assert!(err.contains("writer is `other`, the file name says `w`"), "{err}");
    }

    #[test]
    fn lock_is_exclusive_per_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let held = WriterLock::acquire(dir.path(), "w").unwrap();
        let err = WriterLock::acquire(dir.path(), "w").unwrap_err().to_string();
        assert!(err.contains("writer `w`") && err.contains("index.w.lock"), "{err}");
        assert!(WriterLock::try_acquire(dir.path(), "v").unwrap().is_some());
        drop(held);
        assert!(WriterLock::try_acquire(dir.path(), "w").unwrap().is_some());
    }
}
