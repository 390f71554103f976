//! A dataset folder's inventory: every image with its file stamp, oriented size, content hash and caption file,
//! remembered between runs in a memo so that a restart re-reads only the files whose stamps changed.
//!
//! The memo only saves work, it never decides what a latent holds: a latent's key carries the image's content
//! hash, which a changed stamp makes the scan recompute. A file rewritten within the memo's own clock tick keeps
//! its stamp; rows that new are never trusted (git's "racily clean" rule).
use crate::error::{CacheError, Result};
use rayon::prelude::*;
use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Folders SimpleTuner 4.10.1's local backend never descends into (LocalDataBackend.list_files); every other
/// folder is listed, hidden ones included.
const SKIPPED_FOLDERS: [&str; 6] = [".Spotlight-V100", ".Trashes", ".fseventsd", ".TemporaryItems", ".zfs", ".ipynb_checkpoints"];
/// Memo file format; bump when the row layout changes (an older memo is then ignored, not misread).
const MEMO_MAGIC: &[u8; 8] = b"LCMINV03";
/// A row whose mtime is this close to the memo's creation may have changed within one timestamp tick.
const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// Identity of a file's bytes as the file system reports them; equal stamps mean unchanged content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch: moves on every write, also when the mtime is put back.
    pub ctime_ns: i64,
    /// Inode number.
    pub inode: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            inode: meta.ino(),
        }
    }
}

/// What a caption file next to an image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caption {
    /// The strategy reads no caption file.
    NotRead,
    /// The file's text (UTF-8) and its stamp.
    Text(Stamp, String),
    /// No such file.
    Missing,
    /// The file exists but cannot be read or is not UTF-8 (its stamp, the reason).
    Unreadable(Stamp, String),
}

/// One image of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Path relative to the data folder, '/'-separated.
    pub key: String,
    /// Stamp of the image file.
    pub stamp: Stamp,
    /// Oriented (W, H), or why the header could not be read.
    pub size: std::result::Result<(u32, u32), String>,
    /// 128-bit xxh3 of the file's bytes (0 when it could not be read).
    pub content: u128,
    /// Its caption file, when the strategy reads one.
    pub caption: Caption,
    /// Whether this scan read the file (new or changed stamp) rather than taking the memo's row.
    pub read: bool,
}

/// What to list and read.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lower-case extensions (with the dot) of the image files.
    pub extensions: Vec<String>,
    /// Lower-case extensions of files listed but not read: the rest of what the trainer lists as a dataset's
    /// files (SimpleTuner's list mixes in video and audio), so the inventory answers its listing too.
    pub other_extensions: Vec<String>,
    /// Extension of the caption file read next to each image (`Some(".txt")` for textfile captions).
    pub caption_extension: Option<String>,
}

/// The scan of one folder.
#[derive(Debug)]
pub struct Inventory {
    /// Every image, sorted as the folder's paths sort (component by component).
    pub items: Vec<Item>,
    /// Images whose stamp changed but whose bytes did not (the memo's content hash matched).
    pub touched: usize,
    /// Rows of the memo with no file any more.
    pub removed: usize,
    /// Whether a usable memo was found.
    pub had_memo: bool,
    /// Files and folders whose names are not UTF-8 (left out: keys, caption names and SimpleTuner's metadata
    /// need UTF-8, so the caller names them and stops).
    pub not_utf8: Vec<PathBuf>,
    /// Keys of the files with one of `Options::other_extensions` (sorted as `items`).
    pub others: Vec<String>,
}

impl Inventory {
    /// How many images this scan read from disk.
    pub fn read_count(&self) -> usize {
        self.items.iter().filter(|i| i.read).count()
    }
}

/// Lists `data_dir` (recursively, following links, skipping the folders SimpleTuner's local backend skips)
/// and reads what the memo at `memo` (if any) does not hold for the current stamps.
pub fn scan(data_dir: &Path, options: &Options, memo: Option<&Path>) -> Result<Inventory> {
    let Listing { images: listing, others, not_utf8 } = list(data_dir, options)?;
    let (memo_rows, memo_time) = match memo.map(read_memo) {
        Some(Ok(Some((rows, time)))) => (rows, Some(time)),
        _ => (Vec::new(), None),
    };
    let had_memo = memo_time.is_some();
    let remembered = Remembered::new(&memo_rows);
    let folders = Folders::open(listing.iter().map(|(_, path)| path.as_path()));
    let rows = rows_in_order(&listing, &memo_rows);
    let items: Vec<Item> = listing
        .into_par_iter()
        .zip(rows)
        .map(|((key, path), row)| {
            std::panic::catch_unwind(|| inspect(&key, &path, options, row, memo_time, &folders))
                .unwrap_or_else(|_| unreadable(key, "header parser panicked"))
        })
        .collect();
    Ok(tally(items, &memo_rows, &remembered, had_memo, not_utf8, others))
}

/// The listed files' folders, each opened once (`O_PATH`), so that a file's stamp is read relative to its folder:
/// a restart stats two files per image, and a lookup of the whole path spends most of a stat in the kernel's walk
/// over every component.
struct Folders {
    open: std::collections::HashMap<PathBuf, fs::File>,
}

impl Folders {
    fn open<'a>(paths: impl Iterator<Item = &'a Path>) -> Folders {
        use std::os::unix::fs::OpenOptionsExt;
        let mut open = std::collections::HashMap::new();
        for folder in paths.filter_map(Path::parent) {
            if !open.contains_key(folder) {
                let opened = fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_DIRECTORY).open(folder);
                // A folder that cannot be opened so is stamped through whole paths, as before.
                if let Ok(file) = opened {
                    open.insert(folder.to_path_buf(), file);
                }
            }
        }
        Folders { open }
    }

    /// The stamp of `path` (links followed, as `fs::metadata`).
    fn stamp(&self, path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::io::AsRawFd;
        let (Some(folder), Some(name)) = (path.parent().and_then(|p| self.open.get(p)), path.file_name()) else {
            return fs::metadata(path).map(|meta| Stamp::of(&meta));
        };
        let name = std::ffi::CString::new(name.as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `name` is NUL-terminated, `stat` is written by the call before it is read, `folder` is open.
        if unsafe { libc::fstatat(folder.as_raw_fd(), name.as_ptr(), stat.as_mut_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fstatat returned 0, so it filled `stat`.
        let stat = unsafe { stat.assume_init() };
        Ok(Stamp {
            size: stat.st_size as u64,
            mtime_ns: stat.st_mtime * 1_000_000_000 + stat.st_mtime_nsec,
            ctime_ns: stat.st_ctime * 1_000_000_000 + stat.st_ctime_nsec,
            inode: stat.st_ino,
        })
    }
}

/// The inventory of `items`, counting the memo's rows gone and the images read again whose bytes were the same.
fn tally(
    items: Vec<Item>,
    memo_rows: &[MemoRow],
    remembered: &Remembered<'_>,
    had_memo: bool,
    not_utf8: Vec<PathBuf>,
    others: Vec<String>,
) -> Inventory {
    let present: HashSet<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let removed = memo_rows.iter().filter(|row| !present.contains(row.key.as_str())).count();
    let touched = items
        .iter()
        .filter(|i| i.read && remembered.get(&i.key).is_some_and(|row| row.content == i.content && row.content != 0 && row.stamp != i.stamp))
        .count();
    Inventory { items, touched, removed, had_memo, not_utf8, others }
}

/// Writes the memo of `inventory` to `path` atomically.
pub fn write_memo(path: &Path, inventory: &Inventory, now_ns: i64) -> Result<()> {
    let mut out = Vec::with_capacity(64 + inventory.items.len() * 96);
    out.extend_from_slice(MEMO_MAGIC);
    out.extend_from_slice(&now_ns.to_le_bytes());
    out.extend_from_slice(&(inventory.items.len() as u64).to_le_bytes());
    for item in &inventory.items {
        put_str(&mut out, &item.key);
        put_stamp(&mut out, item.stamp);
        match &item.size {
            Ok((w, h)) => {
                out.push(0);
                out.extend_from_slice(&w.to_le_bytes());
                out.extend_from_slice(&h.to_le_bytes());
            }
            Err(why) => {
                out.push(1);
                put_str(&mut out, why);
            }
        }
        out.extend_from_slice(&item.content.to_le_bytes());
        match &item.caption {
            Caption::NotRead => out.push(0),
            Caption::Missing => out.push(1),
            Caption::Text(stamp, text) => {
                out.push(2);
                put_stamp(&mut out, *stamp);
                put_str(&mut out, text);
            }
            Caption::Unreadable(stamp, why) => {
                out.push(3);
                put_stamp(&mut out, *stamp);
                put_str(&mut out, why);
            }
        }
    }
    out.extend_from_slice(&crc32fast::hash(&out).to_le_bytes());
    write_atomic(path, &out)
}

/// `bytes` as `path`: a temp file named by this process (ranks or machines may write the same memo), fsync,
/// rename. Readers see the old memo or the new one, never a part.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(CacheError::io(path, e));
    }
    Ok(())
}

/// The memo's rows and creation time; `None` for a missing, foreign, truncated or corrupt file (a fresh scan is
/// then the only safe answer).
fn read_memo(path: &Path) -> Result<Option<(Vec<MemoRow>, i64)>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::io(path, e)),
    };
    if bytes.len() < 28 || &bytes[..8] != MEMO_MAGIC {
        return Ok(None);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Ok(None);
    }
    Ok(parse_memo(&body[8..]))
}

fn parse_memo(body: &[u8]) -> Option<(Vec<MemoRow>, i64)> {
    let mut r = Reader { bytes: body, at: 0 };
    let time = r.i64()?;
    let count = r.u64()?;
    let mut rows = Vec::with_capacity(count.min(1 << 24) as usize);
    for _ in 0..count {
        let key = r.string()?;
        let stamp = r.stamp()?;
        let size = match r.u8()? {
            0 => Ok((r.u32()?, r.u32()?)),
            1 => Err(r.string()?),
            _ => return None,
        };
        let content = r.u128()?;
        let caption = match r.u8()? {
            0 => Caption::NotRead,
            1 => Caption::Missing,
            2 => Caption::Text(r.stamp()?, r.string()?),
            3 => Caption::Unreadable(r.stamp()?, r.string()?),
            _ => return None,
        };
        rows.push(MemoRow { key, stamp, size, content, caption });
    }
    (r.at == body.len()).then_some((rows, time))
}

struct MemoRow {
    key: String,
    stamp: Stamp,
    size: std::result::Result<(u32, u32), String>,
    content: u128,
    caption: Caption,
}

/// Memo rows by key (the rows are few enough to index by reference).
struct Remembered<'a> {
    by_key: foldhash::HashMap<&'a str, &'a MemoRow>,
}

impl<'a> Remembered<'a> {
    fn new(rows: &'a [MemoRow]) -> Self {
        Remembered { by_key: rows.iter().map(|row| (row.key.as_str(), row)).collect() }
    }

    fn get(&self, key: &str) -> Option<&'a MemoRow> {
        self.by_key.get(key).copied()
    }
}

fn unreadable(key: String, why: &str) -> Item {
    Item { key, stamp: Stamp::default(), size: Err(why.to_string()), content: 0, caption: Caption::NotRead, read: true }
}

/// Each listed image's memo row, found by walking the listing and the memo side by side: both are sorted by
/// components (the memo is written in inventory order), so a restart looks up a million rows in one pass instead
/// of a million random probes of a hash map. A row out of that order is not found: its file is read again.
fn rows_in_order<'a>(listing: &[(String, PathBuf)], rows: &'a [MemoRow]) -> Vec<Option<&'a MemoRow>> {
    let mut next = 0;
    listing
        .iter()
        .map(|(key, _)| {
            while next < rows.len() && by_components(&rows[next].key, key).is_lt() {
                next += 1;
            }
            rows.get(next).filter(|row| row.key == *key)
        })
        .collect()
}

/// One image: its memo row when the image's and its caption's stamps are unchanged (and not racily new), else a
/// fresh read of header, bytes and caption.
fn inspect(key: &str, path: &Path, options: &Options, row: Option<&MemoRow>, memo_time: Option<i64>, folders: &Folders) -> Item {
    let caption_path = options.caption_extension.as_ref().map(|ext| path.with_extension(ext.trim_start_matches('.')));
    if row.is_none() {
        // No row to compare stamps with: each file is opened once and stamped from the open file (a cold scan of a
        // million files spends most of its time in the kernel's path lookups: this halves them).
        if let Some(item) = read_fresh(key, path, caption_path.as_deref()) {
            return item;
        }
    }
    let stamp = match folders.stamp(path) {
        Ok(stamp) => stamp,
        Err(e) => return unreadable(key.to_string(), &format!("cannot read `{}`: {e}", path.display())),
    };
    let caption_stamp = caption_path.as_ref().map(|p| folders.stamp(p).ok());
    if let Some(item) = from_memo(key, stamp, caption_stamp, row, memo_time) {
        return item;
    }
    let (size, content) = match fs::read(path) {
        Ok(bytes) => {
            let size = crate::scan::header_from_bytes(path, &bytes).map(|h| h.oriented_size()).map_err(|e| e.to_string());
            (size, xxhash_rust::xxh3::xxh3_128(&bytes))
        }
        Err(e) => (Err(CacheError::io(path, e).to_string()), 0),
    };
    let caption = match (caption_path, caption_stamp) {
        (None, _) => Caption::NotRead,
        (Some(_), Some(None)) | (Some(_), None) => Caption::Missing,
        (Some(p), Some(Some(s))) => read_caption(&p, s),
    };
    Item { key: key.to_string(), stamp, size, content, caption, read: true }
}

/// The inventory of the objects under `prefix` in `bucket` (a `type: aws` dataset): keys are the objects' keys,
/// SimpleTuner's names of its samples. Stamps are the listing's (size, last modification, ETag in place of the
/// inode); objects the memo at `memo` does not hold for their stamps are fetched whole, `concurrency` at a time.
/// Sizes are as stored: SimpleTuner decodes a remote image whole, without applying its EXIF orientation.
pub fn scan_bucket(
    bucket: &crate::remote::Bucket,
    prefix: &str,
    options: &Options,
    memo: Option<&Path>,
    concurrency: usize,
) -> Result<Inventory> {
    let objects = bucket.list(prefix)?;
    let wanted = |list: &[String], key: &str| python_extension(key).is_some_and(|e| list.contains(&e));
    let stamps: std::collections::HashMap<&str, Stamp> = objects.iter().map(|o| (o.key.as_str(), object_stamp(o))).collect();
    let mut images: Vec<&str> = objects.iter().map(|o| o.key.as_str()).filter(|k| wanted(&options.extensions, k)).collect();
    images.sort_by(|a, b| by_components(a, b));
    let mut others: Vec<String> =
        objects.iter().map(|o| o.key.clone()).filter(|k| wanted(&options.other_extensions, k)).collect();
    others.sort_by(|a, b| by_components(a, b));
    let (memo_rows, memo_time) = match memo.map(read_memo) {
        Some(Ok(Some((rows, time)))) => (rows, Some(time)),
        _ => (Vec::new(), None),
    };
    let remembered = Remembered::new(&memo_rows);
    // SimpleTuner's caption object: os.path.splitext(key)[0] + extension.
    let caption_keys: Vec<Option<String>> = images
        .iter()
        .map(|key| options.caption_extension.as_ref().map(|ext| format!("{}{ext}", python_stem(key))))
        .collect();
    let mut items: Vec<Option<Item>> = images
        .iter()
        .zip(&caption_keys)
        .map(|(key, caption_key)| {
            let caption_stamp = caption_key.as_ref().map(|k| stamps.get(k.as_str()).copied());
            from_memo(key, stamps[key], caption_stamp, remembered.get(key), memo_time)
        })
        .collect();
    let unread: Vec<usize> = (0..images.len()).filter(|&i| items[i].is_none()).collect();
    let image_keys: Vec<String> = unread.iter().map(|&i| images[i].to_string()).collect();
    let caption_reads: Vec<String> =
        unread.iter().filter_map(|&i| caption_keys[i].clone()).filter(|k| stamps.contains_key(k.as_str())).collect();
    let fetched = bucket.get_all(&image_keys, concurrency);
    let mut captions: std::collections::HashMap<String, std::result::Result<Vec<u8>, String>> =
        caption_reads.iter().cloned().zip(bucket.get_all(&caption_reads, concurrency)).collect();
    for (&i, bytes) in unread.iter().zip(fetched) {
        let key = images[i];
        let (size, content) = match bytes {
            Ok(bytes) => {
                let header = std::panic::catch_unwind(|| crate::scan::header_from_bytes(Path::new(key), &bytes))
                    .unwrap_or_else(|_| Err(CacheError::config("header", "header parser panicked")));
                (header.map(|h| (h.width, h.height)).map_err(|e| e.to_string()), xxhash_rust::xxh3::xxh3_128(&bytes))
            }
            Err(why) => (Err(format!("cannot read s3 object `{key}`: {why}")), 0),
        };
        let caption = match &caption_keys[i] {
            None => Caption::NotRead,
            Some(caption_key) => match (stamps.get(caption_key.as_str()), captions.remove(caption_key)) {
                (Some(&stamp), Some(Ok(bytes))) => caption_text(stamp, bytes),
                (Some(&stamp), Some(Err(why))) => Caption::Unreadable(stamp, why),
                _ => Caption::Missing,
            },
        };
        items[i] = Some(Item { key: key.to_string(), stamp: stamps[key], size, content, caption, read: true });
    }
    let items: Vec<Item> = items.into_iter().flatten().collect();
    Ok(tally(items, &memo_rows, &remembered, memo_time.is_some(), Vec::new(), others))
}

/// A listed object's stamp: its ETag changes with its bytes, so it stands where a file's inode and ctime would.
fn object_stamp(object: &crate::remote::Object) -> Stamp {
    let e_tag = object.e_tag.as_deref().unwrap_or("");
    Stamp {
        size: object.size,
        mtime_ns: object.last_modified_ns,
        ctime_ns: object.last_modified_ns,
        inode: xxhash_rust::xxh3::xxh3_64(e_tag.as_bytes()),
    }
}

/// `os.path.splitext(key)[1].lower()`: the last '.' of the last component, unless the component's leading dots.
fn python_extension(key: &str) -> Option<String> {
    let stem_len = python_stem(key).len();
    (stem_len < key.len()).then(|| key[stem_len..].to_lowercase())
}

/// `os.path.splitext(key)[0]`.
fn python_stem(key: &str) -> &str {
    let name_at = key.rfind('/').map_or(0, |at| at + 1);
    let name = &key[name_at..];
    let leading_dots = name.len() - name.trim_start_matches('.').len();
    match name[leading_dots..].rfind('.') {
        Some(dot) => &key[..name_at + leading_dots + dot],
        None => key,
    }
}

/// The memo's `row` of `key` as an item, when the image's and its caption's stamps (`None`: the strategy reads no
/// caption; `Some(None)`: there is none) are those it was read with and not racily new.
fn from_memo(key: &str, stamp: Stamp, caption_stamp: Option<Option<Stamp>>, row: Option<&MemoRow>, memo_time: Option<i64>) -> Option<Item> {
    let trusted = |s: Stamp| memo_time.is_some_and(|t| s.mtime_ns.max(s.ctime_ns) < t - RACY_WINDOW_NS);
    let row = row?;
    let caption_same = match (&caption_stamp, &row.caption) {
        (None, Caption::NotRead) | (Some(None), Caption::Missing) => true,
        (Some(Some(s)), Caption::Text(old, _) | Caption::Unreadable(old, _)) => s == old && trusted(*s),
        _ => false,
    };
    (row.stamp == stamp && trusted(stamp) && caption_same).then(|| Item {
        key: key.to_string(),
        stamp,
        size: row.size.clone(),
        content: row.content,
        caption: row.caption.clone(),
        read: false,
    })
}

/// `inspect`'s item from one open of the image and of its caption file; None when a file cannot be opened for any
/// reason but absence of the caption (`inspect`'s stat-first path then says why, as it always has).
fn read_fresh(key: &str, path: &Path, caption_path: Option<&Path>) -> Option<Item> {
    let (stamp, bytes) = read_stamped(path).ok()?;
    let caption = match caption_path.map(read_stamped) {
        None => Caption::NotRead,
        Some(Ok((stamp, bytes))) => caption_text(stamp, bytes),
        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Caption::Missing,
        Some(Err(_)) => return None,
    };
    let size = crate::scan::header_from_bytes(path, &bytes).map(|h| h.oriented_size()).map_err(|e| e.to_string());
    Some(Item { key: key.to_string(), stamp, size, content: xxhash_rust::xxh3::xxh3_128(&bytes), caption, read: true })
}

/// The stamp (of the open file) and bytes of `path`.
fn read_stamped(path: &Path) -> std::io::Result<(Stamp, Vec<u8>)> {
    let mut file = fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)?;
    Ok((Stamp::of(&meta), bytes))
}

fn caption_text(stamp: Stamp, bytes: Vec<u8>) -> Caption {
    match String::from_utf8(bytes) {
        Ok(text) => Caption::Text(stamp, text),
        Err(e) => Caption::Unreadable(stamp, format!("not UTF-8 ({e})")),
    }
}

fn read_caption(path: &Path, stamp: Stamp) -> Caption {
    let mut bytes = Vec::with_capacity(stamp.size as usize);
    match fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => caption_text(stamp, bytes),
        Err(e) => Caption::Unreadable(stamp, e.to_string()),
    }
}

struct Listing {
    /// (key, path) of every image, sorted by key component by component.
    images: Vec<(String, PathBuf)>,
    /// Keys of the other listed files, sorted the same way.
    others: Vec<String>,
    /// Entries whose names are not UTF-8.
    not_utf8: Vec<PathBuf>,
}

/// The files under `data_dir` that SimpleTuner's local backend lists for the extensions of `options`.
fn list(data_dir: &Path, options: &Options) -> Result<Listing> {
    let mut images = Vec::new();
    let mut others = Vec::new();
    let mut not_utf8 = Vec::new();
    let mut visited = HashSet::new();
    let mut pending = vec![(data_dir.to_path_buf(), String::new())];
    let has = |extensions: &[String], lower: &str| extensions.iter().any(|ext| lower.ends_with(ext.as_str()));
    // Depth first, subfolders in the order the folder lists them, as os.walk visits them: when two links reach one
    // folder, the name SimpleTuner keeps (the first visited) is the one listed here.
    while let Some((folder, prefix)) = pending.pop() {
        let meta = fs::metadata(&folder).map_err(|e| CacheError::io(&folder, e))?;
        if !visited.insert((meta.dev(), meta.ino())) {
            continue; // a link back into a folder already listed
        }
        let mut subfolders = Vec::new();
        for entry in fs::read_dir(&folder).map_err(|e| CacheError::io(&folder, e))? {
            let entry = entry.map_err(|e| CacheError::io(&folder, e))?;
            let raw_name = entry.file_name();
            let path = entry.path();
            let Some(name) = raw_name.to_str() else {
                not_utf8.push(path);
                continue;
            };
            let is_dir = match entry.file_type() {
                Ok(t) if t.is_symlink() => fs::metadata(&path).is_ok_and(|m| m.is_dir()),
                Ok(t) => t.is_dir(),
                Err(_) => false,
            };
            if is_dir {
                if !SKIPPED_FOLDERS.contains(&name) {
                    subfolders.push((path, format!("{prefix}{name}/")));
                }
                continue;
            }
            let lower = name.to_lowercase();
            if has(&options.extensions, &lower) {
                images.push((format!("{prefix}{name}"), path));
            } else if has(&options.other_extensions, &lower) {
                others.push(format!("{prefix}{name}"));
            }
        }
        pending.extend(subfolders.into_iter().rev());
    }
    images.par_sort_unstable_by(|a, b| by_components(&a.0, &b.0));
    others.sort_unstable_by(|a, b| by_components(a, b));
    not_utf8.sort();
    Ok(Listing { images, others, not_utf8 })
}

/// Keys in the order their '/'-separated components sort: bytewise, with '/' below every byte a name can hold (the
/// same order as comparing the split components, without splitting).
pub(crate) fn by_components(a: &str, b: &str) -> std::cmp::Ordering {
    let lowest_slash = |byte: u8| if byte == b'/' { 0 } else { byte };
    a.bytes().map(lowest_slash).cmp(b.bytes().map(lowest_slash))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_stamp(out: &mut Vec<u8>, s: Stamp) {
    out.extend_from_slice(&s.size.to_le_bytes());
    out.extend_from_slice(&s.mtime_ns.to_le_bytes());
    out.extend_from_slice(&s.ctime_ns.to_le_bytes());
    out.extend_from_slice(&s.inode.to_le_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take(16)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn stamp(&mut self) -> Option<Stamp> {
        Some(Stamp { size: self.u64()?, mtime_ns: self.i64()?, ctime_ns: self.i64()?, inode: self.u64()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(w, h).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    fn options() -> Options {
        Options { extensions: vec![".png".into()], other_extensions: vec![".mp4".into()], caption_extension: Some(".txt".into()) }
    }

    /// Sets a file's mtime `seconds` into the past, so that the memo trusts it.
    fn age(path: &Path, seconds: i64) {
        let meta = fs::metadata(path).unwrap();
        let when = libc::timespec { tv_sec: meta.mtime() - seconds, tv_nsec: 0 };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [when, when].as_ptr(), 0) }, 0);
    }

    #[test]
    fn memo_rows_are_matched_in_one_ordered_pass_across_additions_and_removals() {
        let row = |key: &str| MemoRow { key: key.into(), stamp: Stamp::default(), size: Ok((1, 1)), content: 1, caption: Caption::NotRead };
        // sorted by components: "a/…" before "a.b/…" ('/' sorts below every other byte)
        let memo = [row("a/1.png"), row("a/2.png"), row("a.b/1.png"), row("c.png"), row("e.png")];
        let listed: Vec<(String, PathBuf)> =
            ["a/0.png", "a/2.png", "a.b/1.png", "b.png", "e.png", "f.png"].iter().map(|k| (k.to_string(), PathBuf::from(k))).collect();
        let found: Vec<Option<&str>> = rows_in_order(&listed, &memo).iter().map(|r| r.map(|r| r.key.as_str())).collect();
        assert_eq!(found, [None, Some("a/2.png"), Some("a.b/1.png"), None, Some("e.png"), None]);
    }

    #[test]
    fn stamps_read_relative_to_the_folder_are_those_of_the_whole_path() {
        let dir = folder();
        std::os::unix::fs::symlink(dir.path().join("a.png"), dir.path().join("sub/link.png")).unwrap();
        let paths = ["a.png", "a.txt", "sub/c.PNG", "sub/link.png"].map(|name| dir.path().join(name));
        let folders = Folders::open(paths.iter().map(PathBuf::as_path));
        assert_eq!(folders.open.len(), 2);
        for path in &paths {
            assert_eq!(folders.stamp(path).unwrap(), Stamp::of(&fs::metadata(path).unwrap()), "{}", path.display());
        }
        let missing = dir.path().join("sub/gone.png");
        assert_eq!(folders.stamp(&missing).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        // a folder never opened is stamped through its whole path
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("x.png"), png(1, 1)).unwrap();
        let x = other.path().join("x.png");
        assert_eq!(folders.stamp(&x).unwrap(), Stamp::of(&fs::metadata(&x).unwrap()));
    }

    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        for (name, w, h) in [("b.png", 4, 2), ("a.png", 3, 5), ("sub/c.PNG", 2, 2)] {
            fs::write(dir.path().join(name), png(w, h)).unwrap();
            age(&dir.path().join(name), 60);
        }
        fs::write(dir.path().join("a.txt"), "a cat").unwrap();
        age(&dir.path().join("a.txt"), 60);
        dir
    }

    #[test]
    fn stems_and_extensions_split_as_python_splitext() {
        for (key, stem, ext) in [
            ("a/b.PNG", "a/b", Some(".png")),
            ("a.b/c", "a.b/c", None),
            ("a/.png", "a/.png", None),
            ("a/..x.jpg", "a/..x", Some(".jpg")),
            ("a/b.", "a/b", Some(".")),
            ("c.d.png", "c.d", Some(".png")),
            ("", "", None),
        ] {
            assert_eq!(python_stem(key), stem, "{key}");
            assert_eq!(python_extension(key).as_deref(), ext, "{key}");
        }
    }

    #[test]
    fn lists_as_simpletuner_sorted_reads_sizes_and_captions() {
        let dir = folder();
        let inv = scan(dir.path(), &options(), None).unwrap();
        let keys: Vec<_> = inv.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["a.png", "b.png", "sub/c.PNG"]);
        assert_eq!(inv.items[0].size, Ok((3, 5)));
        assert!(matches!(&inv.items[0].caption, Caption::Text(_, t) if t == "a cat"));
        assert_eq!(inv.items[1].caption, Caption::Missing);
        assert_eq!(inv.items[0].content, xxhash_rust::xxh3::xxh3_128(&png(3, 5)));
        assert_eq!(inv.read_count(), 3);
    }

    #[test]
    fn lists_hidden_folders_and_other_extensions_but_not_skipped_folders() {
        let dir = folder();
        for folder in [".hidden", ".Trashes", ".ipynb_checkpoints"] {
            fs::create_dir(dir.path().join(folder)).unwrap();
            fs::write(dir.path().join(folder).join("x.png"), png(1, 1)).unwrap();
        }
        fs::write(dir.path().join("sub/clip.MP4"), b"not read").unwrap();
        fs::write(dir.path().join("notes.md"), b"not listed").unwrap();
        let inv = scan(dir.path(), &options(), None).unwrap();
        let keys: Vec<_> = inv.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, [".hidden/x.png", "a.png", "b.png", "sub/c.PNG"]);
        assert_eq!(inv.others, ["sub/clip.MP4"]);
    }

    #[test]
    fn keys_sort_as_their_components_do() {
        let mut keys = vec!["a/b", "a-c", "a", "ab", "a/b/c", "a.b/z", "a/a", "b", " a", "a/b-c", "a/b/-"];
        let mut split = keys.clone();
        keys.sort_by(|a, b| by_components(a, b));
        split.sort_by(|a, b| a.split('/').cmp(b.split('/')));
        assert_eq!(keys, split);
    }

    proptest::proptest! {
        #[test]
        fn by_components_is_the_order_of_the_split_components(a in "[ab/ .-]{0,7}", b in "[ab/ .-]{0,7}") {
            proptest::prop_assert_eq!(by_components(&a, &b), a.split('/').cmp(b.split('/')));
        }
    }

    #[test]
    fn a_fresh_read_and_a_stat_first_read_agree() {
        let dir = folder();
        fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
        fs::write(dir.path().join("broken.txt"), [0xff, 0xfe]).unwrap();
        let memo = dir.path().join(".memo");
        let fresh = scan(dir.path(), &options(), None).unwrap(); // no memo row: one open per file
        write_memo(&memo, &fresh, 0).unwrap(); // every row untrusted (racily new): each file stat first, then read
        let stat_first = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!(stat_first.read_count(), 4);
        assert_eq!(stat_first.items, fresh.items);
        assert!(matches!(&fresh.items[2].caption, Caption::Unreadable(_, why) if why.contains("UTF-8")));
    }

    #[test]
    fn memo_rereads_only_what_changed() {
        let dir = folder();
        let memo = dir.path().join(".memo");
        let first = scan(dir.path(), &options(), Some(&memo)).unwrap();
        write_memo(&memo, &first, later()).unwrap();
        let again = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!(again.read_count(), 0);
        assert_eq!(again.items, first.items.iter().map(|i| Item { read: false, ..i.clone() }).collect::<Vec<_>>());

        // Touched but unchanged (a copy's new mtime), edited, caption edited, added, removed.
        let a = dir.path().join("a.png");
        fs::write(&a, png(3, 5)).unwrap();
        fs::write(dir.path().join("b.png"), png(6, 2)).unwrap();
        fs::write(dir.path().join("a.txt"), "a dog").unwrap();
        fs::write(dir.path().join("d.png"), png(1, 1)).unwrap();
        fs::remove_file(dir.path().join("sub/c.PNG")).unwrap();
        let changed = scan(dir.path(), &options(), Some(&memo)).unwrap();
        let keys: Vec<_> = changed.items.iter().map(|i| (i.key.as_str(), i.read)).collect();
        assert_eq!(keys, [("a.png", true), ("b.png", true), ("d.png", true)]);
        assert_eq!(changed.items[0].content, first.items[0].content);
        assert!(matches!(&changed.items[0].caption, Caption::Text(_, t) if t == "a dog"));
        assert_eq!(changed.items[1].size, Ok((6, 2)));
        assert_eq!((changed.touched, changed.removed), (1, 1));
    }

    #[test]
    fn a_same_size_rewrite_with_its_mtime_put_back_is_read_again() {
        let dir = folder();
        let memo = dir.path().join(".memo");
        let caption = dir.path().join("a.txt");
        let mtime = fs::metadata(&caption).unwrap().mtime();
        write_memo(&memo, &scan(dir.path(), &options(), None).unwrap(), later()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20)); // a later ctime on coarse clocks too
        fs::write(&caption, "a dog").unwrap();
        let when = libc::timespec { tv_sec: mtime, tv_nsec: 0 };
        let c = std::ffi::CString::new(caption.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [when, when].as_ptr(), 0) }, 0);
        let again = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!(again.read_count(), 1);
        assert!(matches!(&again.items[0].caption, Caption::Text(_, t) if t == "a dog"));
    }

    #[test]
    fn racily_new_rows_and_bad_memos_are_not_trusted() {
        let dir = folder();
        let memo = dir.path().join(".memo");
        let first = scan(dir.path(), &options(), None).unwrap();
        // A memo written in the same tick as the files' mtimes: nothing in it can be trusted.
        write_memo(&memo, &first, first.items[0].stamp.mtime_ns).unwrap();
        assert_eq!(scan(dir.path(), &options(), Some(&memo)).unwrap().read_count(), 3);
        write_memo(&memo, &first, later()).unwrap();
        let mut bytes = fs::read(&memo).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        fs::write(&memo, &bytes).unwrap();
        let rescanned = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!((rescanned.read_count(), rescanned.had_memo), (3, false));
        fs::write(&memo, b"LCMINV02").unwrap();
        assert!(!scan(dir.path(), &options(), Some(&memo)).unwrap().had_memo);
    }

    #[test]
    fn unreadable_files_are_rows_not_errors() {
        let dir = folder();
        fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
        let inv = scan(dir.path(), &options(), None).unwrap();
        let broken = inv.items.iter().find(|i| i.key == "broken.png").unwrap();
        assert!(broken.size.as_ref().unwrap_err().contains("broken.png"), "{:?}", broken.size);
    }

    /// A memo time past the racy window of files written now (their ctime cannot be dated back), as a memo written
    /// at a later start would have.
    fn later() -> i64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
        now + 2 * RACY_WINDOW_NS
    }
}
