//! Checking and repairing a cache directory. A repair deletes only files this cache wrote, and only when they are
//! proven bad; orphans are reported and removed only on request.
use super::index::{self, Index, ShardRecord, WriterLock};
use super::shard::{self, open_shard, ShardFault};
use crate::error::{CacheError, Result};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// What [`check`] does.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Read every byte (CRC-32). Otherwise: name, presence, size, header, and a CRC only for shards whose mtime
    /// differs from the one recorded at commit.
    pub full: bool,
    /// Delete corrupt shards and drop them, and foreign entries, from their index.
    pub repair: bool,
    /// Delete orphaned shards and temp files.
    pub remove_orphans: bool,
}

/// What happened to a problem shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing (no repair asked).
    Reported,
    /// The file was deleted and its entry dropped.
    Deleted,
    /// The entry was dropped; the file, if any, was not touched.
    Dropped,
    /// Left as it is: the problem may be transient, or a live process holds the writer.
    Kept,
}

impl Action {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Reported => "reported",
            Action::Deleted => "deleted",
            Action::Dropped => "dropped",
            Action::Kept => "kept",
        }
    }
}

/// One shard that failed its check.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The shard's path (the index's name joined onto the directory, for reporting only).
    pub path: PathBuf,
    /// Why.
    pub fault: ShardFault,
    /// What the check did about it.
    pub action: Action,
}

/// Result of [`check`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Failing shards.
    pub problems: Vec<Problem>,
    /// Shard and temp files of this cache that no index lists, still present.
    pub orphans: Vec<PathBuf>,
    /// Orphans deleted (with [`CheckOptions::remove_orphans`]).
    pub removed_orphans: Vec<PathBuf>,
    /// Shards listed by all indexes.
    pub shards: usize,
}

enum Outcome {
    Good,
    /// Good, but the mtime recorded at commit is stale (a copy without `-p`, a version-1 index): record this one.
    GoodAt(i64),
    Bad(ShardFault),
}

fn check_record(dir: &Path, writer: &str, record: &ShardRecord, full: bool) -> Outcome {
    if !index::is_shard_of(&record.file, writer) {
        return Outcome::Bad(ShardFault::Foreign(format!(
            "`{}` is not a shard name of writer `{writer}` (expected {writer}-NNNNN.safetensors); not touched",
            record.file
        )));
    }
    let path = dir.join(&record.file);
    let (file, stamp) = match open_shard(&path) {
        Ok(opened) => opened,
        Err(fault) => return Outcome::Bad(fault),
    };
    if stamp.size != record.bytes {
        return Outcome::Bad(ShardFault::Corrupt(format!("size is {} bytes, index says {}", stamp.size, record.bytes)));
    }
    if let Err(fault) = shard::read_header(&file, stamp.size, &record.keys) {
        return Outcome::Bad(fault);
    }
    let recorded = record.mtime_ns == Some(stamp.mtime_ns);
    if recorded && !full {
        return Outcome::Good;
    }
    match shard::streaming_crc(&file, stamp.size) {
        Ok(crc) if crc != record.crc32 => Outcome::Bad(ShardFault::Corrupt(format!("crc32 is {crc:#010x}, index says {:#010x}", record.crc32))),
        Ok(_) if recorded => Outcome::Good,
        Ok(_) => Outcome::GoodAt(stamp.mtime_ns),
        Err(fault) => Outcome::Bad(fault),
    }
}

/// A regular file (not a link) at `path`.
fn is_regular(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

/// Deletes the corrupt shard at `path`; a shard already gone counts as deleted.
fn delete(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Checks every shard of `dir`: name, presence, size, safetensors header, CRC-32 (see [`CheckOptions::full`]).
/// With `repair`, for each writer whose lock it can take: corrupt shards are deleted and dropped from the index,
/// foreign entries dropped (their files never touched), unreadable shards kept.
pub fn check(dir: &Path, options: CheckOptions) -> Result<Report> {
    let writers = index::writers(dir)?;
    let modify = options.repair || options.remove_orphans;
    let mut locks: HashMap<String, WriterLock> = HashMap::new();
    if modify {
        for w in &writers {
            if let Some(lock) = WriterLock::try_acquire(dir, w)? {
                locks.insert(w.clone(), lock);
            }
        }
    }
    // Read after locking, so that no writer changes an index while it is repaired.
    let indexes: Vec<Index> = writers.iter().map(|w| index::read_index(dir, w)).collect::<Result<_>>()?;
    let jobs: Vec<(usize, usize)> = indexes.iter().enumerate().flat_map(|(i, x)| (0..x.shards.len()).map(move |j| (i, j))).collect();
    let outcomes: Vec<Outcome> = jobs
        .par_iter()
        .map(|&(i, j)| check_record(dir, &indexes[i].writer, &indexes[i].shards[j], options.full))
        .collect();

    let mut report = Report { shards: jobs.len(), ..Report::default() };
    let mut updated: Vec<Option<Index>> = vec![None; indexes.len()];
    for (&(i, j), outcome) in jobs.iter().zip(outcomes) {
        let index = &indexes[i];
        let record = &index.shards[j];
        let held = locks.contains_key(&index.writer);
        let fault = match outcome {
            Outcome::Good => continue,
            Outcome::GoodAt(mtime) => {
                if options.repair && held {
                    let copy = updated[i].get_or_insert_with(|| index.clone());
                    if let Some(r) = copy.shards.iter_mut().find(|r| r.file == record.file) {
                        r.mtime_ns = Some(mtime);
                    }
                }
                continue;
            }
            Outcome::Bad(fault) => fault,
        };
        let path = dir.join(&record.file);
        let mut fault = fault;
        let action = if !options.repair {
            Action::Reported
        } else if !held {
            fault = annotate(fault, &format!("writer `{}` is held by a running process; left for it", index.writer));
            Action::Kept
        } else {
            match &fault {
                ShardFault::Unreadable(_) => Action::Kept,
                ShardFault::Foreign(_) => Action::Dropped,
                ShardFault::Corrupt(_) if !is_regular(&path) => Action::Dropped,
                ShardFault::Corrupt(_) => match delete(&path) {
                    Ok(()) => Action::Deleted,
                    Err(e) => {
                        fault = annotate(fault, &format!("cannot delete: {e}"));
                        Action::Kept
                    }
                },
            }
        };
        if matches!(action, Action::Deleted | Action::Dropped) {
            updated[i].get_or_insert_with(|| index.clone()).shards.retain(|r| r.file != record.file);
        }
        report.problems.push(Problem { path, fault, action });
    }
    for index in updated.into_iter().flatten() {
        index::compact(dir, &index)?;
    }
    find_orphans(dir, &indexes, &mut locks, options.remove_orphans, &mut report)?;
    Ok(report)
}

fn annotate(fault: ShardFault, note: &str) -> ShardFault {
    match fault {
        ShardFault::Corrupt(r) => ShardFault::Corrupt(format!("{r}; {note}")),
        ShardFault::Unreadable(r) => ShardFault::Unreadable(format!("{r}; {note}")),
        ShardFault::Foreign(r) => ShardFault::Foreign(format!("{r}; {note}")),
    }
}

/// Regular files named as this cache names shards or temp files that no index lists.
fn find_orphans(dir: &Path, indexes: &[Index], locks: &mut HashMap<String, WriterLock>, remove: bool, report: &mut Report) -> Result<()> {
    let listed: HashSet<(&str, &str)> =
        indexes.iter().flat_map(|x| x.shards.iter().map(move |r| (x.writer.as_str(), r.file.as_str()))).collect();
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| CacheError::io(dir, e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let writer = match index::parse_shard_name(&name) {
            Some((w, _)) if listed.contains(&(w, name.as_str())) => continue,
            Some((w, _)) => w.to_string(),
            None => match index::writer_of_temp_file(&name) {
                Some(w) => w.to_string(),
                None => continue,
            },
        };
        let path = dir.join(&name);
        if !is_regular(&path) {
            continue;
        }
        if remove {
            if !locks.contains_key(&writer) {
                if let Some(lock) = WriterLock::try_acquire(dir, &writer)? {
                    locks.insert(writer.clone(), lock);
                }
            }
            if locks.contains_key(&writer) && fs::remove_file(&path).is_ok() {
                report.removed_orphans.push(path);
                continue;
            }
        }
        report.orphans.push(path);
    }
    Ok(())
}

/// Full check of `dir`; (shard path, reason) for every failing shard. `repair` as in [`check`].
pub fn verify(dir: &Path, repair: bool) -> Result<Vec<(PathBuf, String)>> {
    let report = check(dir, CheckOptions { full: true, repair, remove_orphans: false })?;
    Ok(report.problems.into_iter().map(|p| (p.path, p.fault.reason().to_string())).collect())
}
