//! A dataset folder's inventory: every image with its file stamp, oriented size, content hash and caption file,
//! remembered between runs in a memo so that a restart re-reads only the files whose stamps changed.
//!
//! The memo only saves work, it never decides what a latent holds: a latent's key carries the image's content
//! hash, which a changed stamp makes the scan recompute. A file rewritten within the memo's own clock tick keeps
//! its stamp; rows that new are never trusted (git's "racily clean" rule).
use crate::error::{CacheError, Result};
use crate::memo::{CaptionRef, Rows, RowsBuilder, Token};
use rayon::prelude::*;
use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Folders SimpleTuner 4.10.1's local backend never descends into (LocalDataBackend.list_files); every other
/// folder is listed, hidden ones included.
const SKIPPED_FOLDERS: [&str; 6] = [".Spotlight-V100", ".Trashes", ".fseventsd", ".TemporaryItems", ".zfs", ".ipynb_checkpoints"];
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

/// The scan of one folder: every image, sorted as the folder's paths sort (component by component), with the other
/// listed files. The rows are one buffer (`memo::Rows`): the memo itself, mapped, when nothing changed since it was
/// written.
pub struct Inventory {
    rows: Rows,
    /// Per image, whether this scan read it (new or changed stamps) rather than taking the memo's row; empty when
    /// it read none.
    read: Vec<bool>,
    /// Images whose stamp changed but whose bytes did not (the memo's content hash matched).
    pub touched: usize,
    /// Rows of the memo with no file any more.
    pub removed: usize,
    /// Whether a usable memo was found.
    pub had_memo: bool,
}

impl Inventory {
    /// Images.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Path of image `i` relative to the folder, '/'-separated.
    pub fn key(&self, i: usize) -> &str {
        self.rows.key(i)
    }

    /// Oriented (W, H) of image `i`, or why its header could not be read.
    pub fn size(&self, i: usize) -> std::result::Result<(u32, u32), &str> {
        self.rows.size(i)
    }

    /// 128-bit xxh3 of image `i`'s bytes (0 when they could not be read).
    pub fn content(&self, i: usize) -> u128 {
        self.rows.content(i)
    }

    /// Image `i`'s caption file.
    pub fn caption(&self, i: usize) -> CaptionRef<'_> {
        self.rows.caption(i)
    }

    /// Image `i` as an owned item.
    pub fn item(&self, i: usize) -> Item {
        Item { read: self.read.get(i).copied().unwrap_or(false), ..self.rows.item(i) }
    }

    /// How many images this scan read from disk.
    pub fn read_count(&self) -> usize {
        self.read.iter().filter(|&&read| read).count()
    }

    /// Keys of the files with one of `Options::other_extensions`, sorted as the images.
    pub fn others(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.rows.others()
    }

    /// Paths (raw bytes) of the files and folders whose names are not UTF-8 (left out: keys, caption names and
    /// SimpleTuner's metadata need UTF-8, so the caller names them and stops).
    pub fn not_utf8(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.rows.not_utf8()
    }

    /// An inventory of `items`, as a scan that read them would give.
    #[cfg(test)]
    pub(crate) fn of_items(items: &[Item]) -> Inventory {
        let mut builder = RowsBuilder::with_capacity(items.len());
        items.iter().for_each(|item| builder.push_item(item));
        Inventory { rows: builder.finish([], []), read: vec![true; items.len()], touched: 0, removed: 0, had_memo: false }
    }

    /// The token of the memo these rows are, as it lies on disk (nothing changed since it was written); None when
    /// the scan changed anything, and the memo should be written again.
    pub fn memo_token(&self) -> Option<Token> {
        self.rows.token()
    }

    /// The inventory a memo holds, when its token is one of `tokens`: what a machine's first rank scanned (and
    /// confirmed or wrote) in this start, taken by the other ranks without a stat. None when the memo cannot be read
    /// or is another one: the caller scans for itself.
    pub fn of_memo(path: &Path, tokens: &[Token]) -> Option<Inventory> {
        let rows = Rows::open_if(path, |token| tokens.contains(&token)).ok().flatten()?;
        Some(Inventory { rows, read: Vec::new(), touched: 0, removed: 0, had_memo: true })
    }
}

/// Lists `data_dir` (recursively, following links, skipping the folders SimpleTuner's local backend skips)
/// and reads what the memo at `memo` (if any) does not hold for the current stamps.
pub fn scan(data_dir: &Path, options: &Options, memo: Option<&Path>) -> Result<Inventory> {
    let Listing { images: listing, others, not_utf8 } = list(data_dir, options)?;
    let memo = opened_memo(memo);
    let folders = Folders::open(listing.iter().map(|(_, path)| path.as_path()));
    let rows = rows_in_order(listing.iter().map(|(key, _)| key.as_str()), memo.as_ref());
    let scanned: Vec<Scanned> = listing
        .into_par_iter()
        .zip(rows.par_iter())
        .map(|((key, path), &row)| {
            let row = row.zip(memo.as_ref()).map(|(i, memo)| (memo, i));
            std::panic::catch_unwind(|| inspect(&key, &path, options, row, &folders))
                .unwrap_or_else(|_| Scanned::Read(unreadable(key, "header parser panicked"), row.map(|(_, i)| i)))
        })
        .collect();
    use std::os::unix::ffi::OsStrExt;
    Ok(assemble(memo, scanned, &others, not_utf8.iter().map(|p| p.as_os_str().as_bytes())))
}

/// The memo at `path`; none when there is no usable one.
fn opened_memo(path: Option<&Path>) -> Option<Rows> {
    path.and_then(|path| Rows::open_if(path, |_| true).ok().flatten())
}

/// The listed files' folders, each opened once (`O_PATH`), so that a file is stamped and opened relative to its
/// folder: a restart stats two files per image and a cold scan opens two, and a lookup of the whole path spends
/// much of a stat or an open in the kernel's walk over every component (a cold scan of a million images: 9.9 s
/// through whole paths, 7.5 s relative to the folders).
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

    /// `path`'s opened folder and its file name as the `*at` calls take it; None when the folder was not opened.
    fn in_folder(&self, path: &Path) -> Option<std::io::Result<(std::os::unix::io::RawFd, std::ffi::CString)>> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::io::AsRawFd;
        let folder = path.parent().and_then(|p| self.open.get(p))?;
        let name = std::ffi::CString::new(path.file_name()?.as_bytes());
        Some(name.map(|name| (folder.as_raw_fd(), name)).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))
    }

    /// `path` opened for reading relative to its folder (one component looked up, not the whole path); through the
    /// whole path when its folder was not opened.
    fn open_file(&self, path: &Path) -> std::io::Result<fs::File> {
        use std::os::unix::io::FromRawFd;
        let Some(found) = self.in_folder(path) else {
            return fs::File::open(path);
        };
        let (folder, name) = found?;
        // SAFETY: `name` is NUL-terminated and `folder` is open.
        let fd = unsafe { libc::openat(folder, name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened, and nothing else owns it.
        Ok(unsafe { fs::File::from_raw_fd(fd) })
    }

    /// The stamp of `path` (links followed, as `fs::metadata`).
    fn stamp(&self, path: &Path) -> std::io::Result<Stamp> {
        let Some(found) = self.in_folder(path) else {
            return fs::metadata(path).map(|meta| Stamp::of(&meta));
        };
        let (folder, name) = found?;
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `name` is NUL-terminated, `stat` is written by the call before it is read, `folder` is open.
        if unsafe { libc::fstatat(folder, name.as_ptr(), stat.as_mut_ptr(), 0) } != 0 {
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

/// What the scan knows of one listed image.
enum Scanned {
    /// Read from disk (new, or its stamps changed), with its memo row if it had one.
    Read(Item, Option<usize>),
    /// Unchanged since its memo row.
    Remembered(usize),
}

/// The inventory of the listed images, counting the memo's rows gone and the images read again whose bytes were
/// the same. When nothing differs from the memo, the inventory is the memo itself.
fn assemble<'a>(
    memo: Option<Rows>,
    scanned: Vec<Scanned>,
    others: &'a [String],
    not_utf8: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
) -> Inventory {
    let memo_row = |scanned: &Scanned| match scanned {
        Scanned::Read(_, row) => *row,
        Scanned::Remembered(row) => Some(*row),
    };
    let matched = scanned.iter().filter_map(memo_row).count();
    let removed = memo.as_ref().map_or(0, |memo| memo.len().saturating_sub(matched));
    let touched = memo.as_ref().map_or(0, |memo| {
        let same_bytes = |item: &Item, row: usize| item.content != 0 && memo.content(row) == item.content && memo.stamp(row) != item.stamp;
        scanned.iter().filter(|s| matches!(s, Scanned::Read(item, Some(row)) if same_bytes(item, *row))).count()
    });
    let read: Vec<bool> = scanned.iter().map(|s| matches!(s, Scanned::Read(..))).collect();
    let unchanged = |memo: &Rows| {
        removed == 0
            && !read.contains(&true)
            && memo.others().eq(others.iter().map(String::as_str))
            && memo.not_utf8().eq(not_utf8.clone())
    };
    match memo {
        Some(memo) if unchanged(&memo) => Inventory { rows: memo, read: Vec::new(), touched: 0, removed: 0, had_memo: true },
        memo => {
            let mut builder = RowsBuilder::with_capacity(scanned.len());
            for scanned in &scanned {
                match (scanned, &memo) {
                    (Scanned::Read(item, _), _) => builder.push_item(item),
                    (Scanned::Remembered(row), Some(memo)) => builder.push_row(memo, *row),
                    (Scanned::Remembered(_), None) => {} // rows are remembered from a memo only
                }
            }
            let rows = builder.finish(others.iter().map(String::as_str), not_utf8);
            Inventory { rows, read, touched, removed, had_memo: memo.is_some() }
        }
    }
}

/// Writes the memo of `inventory` to `path` atomically, created at `now_ns`; returns its token.
pub fn write_memo(path: &Path, inventory: &Inventory, now_ns: i64) -> Result<Token> {
    inventory.rows.write(path, now_ns)
}

fn unreadable(key: String, why: &str) -> Item {
    Item { key, stamp: Stamp::default(), size: Err(why.to_string()), content: 0, caption: Caption::NotRead, read: true }
}

/// Each listed image's memo row, found by walking the listing and the memo side by side: both are sorted by
/// components (the memo is written in inventory order), so a restart looks up a million rows in one pass instead
/// of a million random probes of a hash map. A row out of that order is not found: its file is read again.
fn rows_in_order<'k>(keys: impl Iterator<Item = &'k str>, memo: Option<&Rows>) -> Vec<Option<usize>> {
    let Some(memo) = memo else {
        return keys.map(|_| None).collect();
    };
    let mut next = 0;
    keys.map(|key| {
        while next < memo.len() && by_components(memo.key(next), key).is_lt() {
            next += 1;
        }
        (next < memo.len() && memo.key(next) == key).then_some(next)
    })
    .collect()
}

/// One image: its memo row when the image's and its caption's stamps are unchanged (and not racily new), else a
/// fresh read of header, bytes and caption.
fn inspect(key: &str, path: &Path, options: &Options, row: Option<(&Rows, usize)>, folders: &Folders) -> Scanned {
    let caption_path = options.caption_extension.as_ref().map(|ext| path.with_extension(ext.trim_start_matches('.')));
    let memo_row = row.map(|(_, i)| i);
    if row.is_none() {
        // No row to compare stamps with: each file is opened once and stamped from the open file (a cold scan of a
        // million files spends most of its time in the kernel's path lookups: this halves them).
        if let Some(item) = read_fresh(key, path, caption_path.as_deref(), folders) {
            return Scanned::Read(item, None);
        }
    }
    let stamp = match folders.stamp(path) {
        Ok(stamp) => stamp,
        Err(e) => return Scanned::Read(unreadable(key.to_string(), &format!("cannot read `{}`: {e}", path.display())), memo_row),
    };
    let caption_stamp = caption_path.as_ref().map(|p| folders.stamp(p).ok());
    if let Some((memo, i)) = row {
        if unchanged(memo, i, stamp, caption_stamp) {
            return Scanned::Remembered(i);
        }
    }
    let (size, content) = match folders.open_file(path).and_then(|mut file| read_stamped_size(&mut file, stamp.size)) {
        Ok(bytes) => {
            let size = crate::scan::header_from_bytes(path, &bytes).map(|h| h.oriented_size()).map_err(|e| e.to_string());
            (size, xxhash_rust::xxh3::xxh3_128(&bytes))
        }
        Err(e) => (Err(CacheError::io(path, e).to_string()), 0),
    };
    let caption = match (caption_path, caption_stamp) {
        (None, _) => Caption::NotRead,
        (Some(_), Some(None)) | (Some(_), None) => Caption::Missing,
        (Some(p), Some(Some(s))) => read_caption(&p, s, folders),
    };
    Scanned::Read(Item { key: key.to_string(), stamp, size, content, caption, read: true }, memo_row)
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
    let memo = opened_memo(memo);
    let rows = rows_in_order(images.iter().copied(), memo.as_ref());
    // SimpleTuner's caption object: os.path.splitext(key)[0] + extension.
    let caption_keys: Vec<Option<String>> = images
        .iter()
        .map(|key| options.caption_extension.as_ref().map(|ext| format!("{}{ext}", python_stem(key))))
        .collect();
    let mut scanned: Vec<Option<Scanned>> = images
        .iter()
        .zip(&caption_keys)
        .zip(&rows)
        .map(|((key, caption_key), row)| {
            let caption_stamp = caption_key.as_ref().map(|k| stamps.get(k.as_str()).copied());
            let memo = memo.as_ref()?;
            let row = (*row)?;
            unchanged(memo, row, stamps[key], caption_stamp).then_some(Scanned::Remembered(row))
        })
        .collect();
    let unread: Vec<usize> = (0..images.len()).filter(|&i| scanned[i].is_none()).collect();
    let image_keys: Vec<String> = unread.iter().map(|&i| images[i].to_string()).collect();
    let caption_reads: Vec<String> =
        unread.iter().filter_map(|&i| caption_keys[i].clone()).filter(|k| stamps.contains_key(k.as_str())).collect();
    let fetched = bucket.get_all(&image_keys, concurrency);
    let mut captions: std::collections::HashMap<String, std::result::Result<Vec<u8>, String>> =
        caption_reads.iter().cloned().zip(bucket.get_all(&caption_reads, concurrency)).collect();
    for (&i, bytes) in unread.iter().zip(fetched) {
        let key = images[i];
        // An object that could not be fetched keeps no stamp in the memo (as an unreadable local file): the next scan
        // fetches it again, for a network error passes. Bytes whose header cannot be read are remembered as such.
        let (size, content, stamp) = measured(key, stamps[key], bytes.map_err(|why| format!("cannot read s3 object `{key}`: {why}")), false);
        let caption = match &caption_keys[i] {
            None => Caption::NotRead,
            Some(caption_key) => match (stamps.get(caption_key.as_str()), captions.remove(caption_key)) {
                (Some(&stamp), Some(Ok(bytes))) => caption_text(stamp, bytes),
                (Some(_), Some(Err(why))) => Caption::Unreadable(Stamp::default(), why),
                _ => Caption::Missing,
            },
        };
        scanned[i] = Some(Scanned::Read(Item { key: key.to_string(), stamp, size, content, caption, read: true }, rows[i]));
    }
    Ok(assemble(memo, scanned.into_iter().flatten().collect(), &others, std::iter::empty()))
}

/// An image's size, content hash and stamp from its bytes, or why they could not be read (no size, no hash, and a
/// default stamp: never remembered, so the next scan reads it again, for a read error may pass). Bytes whose header
/// cannot be read are remembered as such. `oriented`: the size after the EXIF orientation, as PIL's `exif_transpose`
/// gives it; else as stored.
fn measured(
    key: &str,
    stamp: Stamp,
    bytes: std::result::Result<Vec<u8>, String>,
    oriented: bool,
) -> (std::result::Result<(u32, u32), String>, u128, Stamp) {
    match bytes {
        Ok(bytes) => {
            let header = std::panic::catch_unwind(|| crate::scan::header_from_bytes(Path::new(key), &bytes))
                .unwrap_or_else(|_| Err(CacheError::config("header", "header parser panicked")));
            let size = header
                .map(|h| if oriented { h.oriented_size() } else { (h.width, h.height) })
                .map_err(|e| e.to_string());
            (size, xxhash_rust::xxh3::xxh3_128(&bytes), stamp)
        }
        Err(why) => (Err(why), 0, Stamp::default()),
    }
}

/// How a packed source's samples are read: `keys` -> per key, its bytes or why they cannot be read; Err stops the
/// scan (the reader itself failed, not one sample).
pub type ReadBlobs<'a> = dyn FnMut(&[String]) -> Result<Vec<std::result::Result<Vec<u8>, String>>> + 'a;

/// The inventory of samples held inside other files (a webshart dataset's tar members, a Hugging Face dataset's
/// table rows), listed by their source's own index: `listed` holds each sample's key (SimpleTuner's name of it) and
/// a stamp of the place its bytes lie in, which changes whenever they may have. Samples the memo at `memo` does not
/// hold for their stamps are read through `read`, `chunk` at a time, their headers and hashes computed on rayon.
pub fn scan_blobs(
    mut listed: Vec<(String, Stamp)>,
    memo: Option<&Path>,
    oriented: bool,
    chunk: usize,
    read: &mut ReadBlobs<'_>,
) -> Result<Inventory> {
    listed.sort_by(|a, b| by_components(&a.0, &b.0));
    if let Some(pair) = listed.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(CacheError::config("keys", format!("the source lists `{}` twice", pair[0].0)));
    }
    let memo = opened_memo(memo);
    let rows = rows_in_order(listed.iter().map(|(key, _)| key.as_str()), memo.as_ref());
    let mut scanned: Vec<Option<Scanned>> = listed
        .iter()
        .zip(&rows)
        .map(|((_, stamp), row)| {
            let (memo, row) = (memo.as_ref()?, (*row)?);
            unchanged(memo, row, *stamp, None).then_some(Scanned::Remembered(row))
        })
        .collect();
    let unread: Vec<usize> = (0..listed.len()).filter(|&i| scanned[i].is_none()).collect();
    for part in unread.chunks(chunk.max(1)) {
        let keys: Vec<String> = part.iter().map(|&i| listed[i].0.clone()).collect();
        let blobs = read(&keys)?;
        if blobs.len() != keys.len() {
            return Err(CacheError::config("read", format!("the source gave {} samples for {} keys", blobs.len(), keys.len())));
        }
        let items: Vec<Item> = part
            .par_iter()
            .zip(blobs.into_par_iter())
            .map(|(&i, bytes)| {
                let (key, stamp) = (&listed[i].0, listed[i].1);
                let (size, content, stamp) = measured(key, stamp, bytes.map_err(|why| format!("cannot read `{key}`: {why}")), oriented);
                Item { key: key.clone(), stamp, size, content, caption: Caption::NotRead, read: true }
            })
            .collect();
        for (&i, item) in part.iter().zip(items) {
            scanned[i] = Some(Scanned::Read(item, rows[i]));
        }
    }
    Ok(assemble(memo, scanned.into_iter().flatten().collect(), &[], std::iter::empty()))
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

/// Whether the memo's row `i` holds the image for these stamps: the image's and its caption's (`None`: the
/// strategy reads no caption; `Some(None)`: there is none) are those it was read with, and not racily new.
fn unchanged(memo: &Rows, i: usize, stamp: Stamp, caption_stamp: Option<Option<Stamp>>) -> bool {
    let time = memo.time();
    let trusted = |s: Stamp| s.mtime_ns.max(s.ctime_ns) < time - RACY_WINDOW_NS;
    let caption_same = match (caption_stamp, memo.caption(i)) {
        (None, CaptionRef::NotRead) | (Some(None), CaptionRef::Missing) => true,
        (Some(Some(s)), CaptionRef::Text(old, _) | CaptionRef::Unreadable(old, _)) => s == old && trusted(s),
        _ => false,
    };
    memo.stamp(i) == stamp && trusted(stamp) && caption_same
}

/// `inspect`'s item from one open of the image and of its caption file; None when a file cannot be opened for any
/// reason but absence of the caption (`inspect`'s stat-first path then says why, as it always has).
fn read_fresh(key: &str, path: &Path, caption_path: Option<&Path>, folders: &Folders) -> Option<Item> {
    let (stamp, bytes) = read_stamped(path, folders).ok()?;
    let caption = match caption_path.map(|p| read_stamped(p, folders)) {
        None => Caption::NotRead,
        Some(Ok((stamp, bytes))) => caption_text(stamp, bytes),
        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Caption::Missing,
        Some(Err(_)) => return None,
    };
    let size = crate::scan::header_from_bytes(path, &bytes).map(|h| h.oriented_size()).map_err(|e| e.to_string());
    Some(Item { key: key.to_string(), stamp, size, content: xxhash_rust::xxh3::xxh3_128(&bytes), caption, read: true })
}

/// The stamp (of the open file) and bytes of `path`.
fn read_stamped(path: &Path, folders: &Folders) -> std::io::Result<(Stamp, Vec<u8>)> {
    let mut file = folders.open_file(path)?;
    let meta = file.metadata()?;
    Ok((Stamp::of(&meta), read_stamped_size(&mut file, meta.len())?))
}

/// The first `size` bytes of `file` (fewer if it ends sooner): the size its stamp gives. `read_to_end` would make one
/// more read per file to find the end, a tenth of a cold scan's system calls; a file that grew after it was stamped
/// gets a new stamp, so the next scan reads it again.
fn read_stamped_size(file: &mut fs::File, size: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0; size as usize];
    let mut filled = 0;
    while filled < bytes.len() {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(filled);
    Ok(bytes)
}

fn caption_text(stamp: Stamp, bytes: Vec<u8>) -> Caption {
    match String::from_utf8(bytes) {
        Ok(text) => Caption::Text(stamp, text),
        Err(e) => Caption::Unreadable(stamp, format!("not UTF-8 ({e})")),
    }
}

fn read_caption(path: &Path, stamp: Stamp, folders: &Folders) -> Caption {
    match folders.open_file(path).and_then(|mut f| read_stamped_size(&mut f, stamp.size)) {
        Ok(bytes) => caption_text(stamp, bytes),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(w, h).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    fn items(inventory: &Inventory) -> Vec<Item> {
        (0..inventory.len()).map(|i| inventory.item(i)).collect()
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
        // sorted by components: "a/…" before "a.b/…" ('/' sorts below every other byte)
        let mut memo = RowsBuilder::with_capacity(5);
        for key in ["a/1.png", "a/2.png", "a.b/1.png", "c.png", "e.png"] {
            memo.push(key, Stamp::default(), Ok((1, 1)), 1, CaptionRef::NotRead);
        }
        let memo = memo.finish([], []);
        let listed = ["a/0.png", "a/2.png", "a.b/1.png", "b.png", "e.png", "f.png"];
        let found: Vec<Option<&str>> = rows_in_order(listed.into_iter(), Some(&memo)).iter().map(|r| r.map(|r| memo.key(r))).collect();
        assert_eq!(found, [None, Some("a/2.png"), Some("a.b/1.png"), None, Some("e.png"), None]);
    }

    #[test]
    fn stamps_and_bytes_read_relative_to_the_folder_are_those_of_the_whole_path() {
        let dir = folder();
        std::os::unix::fs::symlink(dir.path().join("a.png"), dir.path().join("sub/link.png")).unwrap();
        let paths = ["a.png", "a.txt", "sub/c.PNG", "sub/link.png"].map(|name| dir.path().join(name));
        let folders = Folders::open(paths.iter().map(PathBuf::as_path));
        assert_eq!(folders.open.len(), 2);
        for path in &paths {
            let whole = (Stamp::of(&fs::metadata(path).unwrap()), fs::read(path).unwrap());
            assert_eq!(folders.stamp(path).unwrap(), whole.0, "{}", path.display());
            assert_eq!(read_stamped(path, &folders).unwrap(), whole, "{}", path.display());
        }
        let missing = dir.path().join("sub/gone.png");
        assert_eq!(folders.stamp(&missing).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert_eq!(folders.open_file(&missing).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        // a folder never opened is stamped and read through its whole path
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("x.png"), png(1, 1)).unwrap();
        let x = other.path().join("x.png");
        assert_eq!(folders.stamp(&x).unwrap(), Stamp::of(&fs::metadata(&x).unwrap()));
        assert_eq!(read_stamped(&x, &folders).unwrap().1, png(1, 1));
    }

    #[test]
    fn a_file_is_read_up_to_its_stamped_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        fs::write(&path, b"red circle").unwrap();
        let read = |size| read_stamped_size(&mut fs::File::open(&path).unwrap(), size).unwrap();
        assert_eq!(read(10), b"red circle");
        assert_eq!(read(3), b"red"); // it grew after it was stamped: its new stamp has it read again
        assert_eq!(read(64), b"red circle"); // it shrank
        let folders = Folders::open([path.as_path()].into_iter());
        assert_eq!(read_stamped(&path, &folders).unwrap(), (Stamp::of(&fs::metadata(&path).unwrap()), b"red circle".to_vec()));
        fs::write(&path, b"").unwrap();
        assert_eq!(read_stamped(&path, &folders).unwrap().1, b"");
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
        let keys: Vec<_> = (0..inv.len()).map(|i| inv.key(i)).collect();
        assert_eq!(keys, ["a.png", "b.png", "sub/c.PNG"]);
        assert_eq!(items(&inv)[0].size, Ok((3, 5)));
        assert!(matches!(&items(&inv)[0].caption, Caption::Text(_, t) if t == "a cat"));
        assert_eq!(items(&inv)[1].caption, Caption::Missing);
        assert_eq!(items(&inv)[0].content, xxhash_rust::xxh3::xxh3_128(&png(3, 5)));
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
        let keys: Vec<_> = (0..inv.len()).map(|i| inv.key(i)).collect();
        assert_eq!(keys, [".hidden/x.png", "a.png", "b.png", "sub/c.PNG"]);
        assert_eq!(inv.others().collect::<Vec<_>>(), ["sub/clip.MP4"]);
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
        assert_eq!(items(&stat_first), items(&fresh));
        assert!(matches!(&items(&fresh)[2].caption, Caption::Unreadable(_, why) if why.contains("UTF-8")));
    }

    #[test]
    fn memo_rereads_only_what_changed() {
        let dir = folder();
        let memo = dir.path().join(".memo");
        let first = scan(dir.path(), &options(), Some(&memo)).unwrap();
        write_memo(&memo, &first, later()).unwrap();
        let again = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!(again.read_count(), 0);
        assert_eq!(items(&again), items(&first).iter().map(|i| Item { read: false, ..i.clone() }).collect::<Vec<_>>());

        // Touched but unchanged (a copy's new mtime), edited, caption edited, added, removed.
        let a = dir.path().join("a.png");
        fs::write(&a, png(3, 5)).unwrap();
        fs::write(dir.path().join("b.png"), png(6, 2)).unwrap();
        fs::write(dir.path().join("a.txt"), "a dog").unwrap();
        fs::write(dir.path().join("d.png"), png(1, 1)).unwrap();
        fs::remove_file(dir.path().join("sub/c.PNG")).unwrap();
        let changed = scan(dir.path(), &options(), Some(&memo)).unwrap();
        let keys: Vec<_> = (0..changed.len()).map(|i| (changed.key(i), changed.item(i).read)).collect();
        assert_eq!(keys, [("a.png", true), ("b.png", true), ("d.png", true)]);
        assert_eq!(items(&changed)[0].content, items(&first)[0].content);
        assert!(matches!(&items(&changed)[0].caption, Caption::Text(_, t) if t == "a dog"));
        assert_eq!(items(&changed)[1].size, Ok((6, 2)));
        assert_eq!((changed.touched, changed.removed), (1, 1));
    }

    #[test]
    fn an_unchanged_folder_is_its_memo_which_other_ranks_take_by_its_token() {
        let dir = folder();
        let memo = dir.path().join(".memo");
        let first = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!(first.memo_token(), None); // read from disk: the memo is to be written
        let token = write_memo(&memo, &first, later()).unwrap();
        let again = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!(again.memo_token(), Some(token));
        let shared = Inventory::of_memo(&memo, &[token]).unwrap();
        assert_eq!(items(&shared), items(&again));
        assert_eq!((shared.read_count(), shared.others().collect::<Vec<_>>()), (0, vec![]));
        assert!(Inventory::of_memo(&memo, &[(token.0 + 1, token.1), (token.0, token.1 ^ 1)]).is_none());
        // a file the memo does not know, even one not read (another extension): no longer the memo
        fs::write(dir.path().join("clip.mp4"), b"x").unwrap();
        let listed = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!((listed.memo_token(), listed.read_count()), (None, 0));
        assert_eq!(listed.others().collect::<Vec<_>>(), ["clip.mp4"]);
        // once rewritten, the previous token no longer names it
        let token2 = write_memo(&memo, &listed, later()).unwrap();
        assert!(Inventory::of_memo(&memo, &[token]).is_none());
        assert_eq!(items(&Inventory::of_memo(&memo, &[token, token2]).unwrap()), items(&again));
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
        assert!(matches!(&items(&again)[0].caption, Caption::Text(_, t) if t == "a dog"));
    }

    #[test]
    fn racily_new_rows_and_bad_memos_are_not_trusted() {
        let dir = folder();
        let memo = dir.path().join(".memo");
        let first = scan(dir.path(), &options(), None).unwrap();
        // A memo written in the same tick as the files' mtimes: nothing in it can be trusted.
        write_memo(&memo, &first, items(&first)[0].stamp.mtime_ns).unwrap();
        assert_eq!(scan(dir.path(), &options(), Some(&memo)).unwrap().read_count(), 3);
        write_memo(&memo, &first, later()).unwrap();
        let mut bytes = fs::read(&memo).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        fs::write(&memo, &bytes).unwrap();
        let rescanned = scan(dir.path(), &options(), Some(&memo)).unwrap();
        assert_eq!((rescanned.read_count(), rescanned.had_memo), (3, false));
        fs::write(&memo, b"LCMINV03").unwrap();
        assert!(!scan(dir.path(), &options(), Some(&memo)).unwrap().had_memo);
    }

    #[test]
    fn unreadable_files_are_rows_not_errors() {
        let dir = folder();
        fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
        let inv = scan(dir.path(), &options(), None).unwrap();
        let broken = items(&inv).into_iter().find(|i| i.key == "broken.png").unwrap();
        assert!(broken.size.as_ref().unwrap_err().contains("broken.png"), "{:?}", broken.size);
    }

    #[test]
    fn packed_samples_are_read_once_then_only_when_their_stamps_change() {
        let dir = tempfile::tempdir().unwrap();
        let memo = dir.path().join(".memo");
        let stamp = |size: u64| Stamp { size, mtime_ns: 1, ctime_ns: 1, inode: 7 };
        let blobs = |n: u32| -> Vec<u8> { png(n, 2 * n) };
        let listed = |last: u64| vec![("10.jpg".to_string(), stamp(10)), ("2.jpg".to_string(), stamp(2)), ("1.jpg".to_string(), stamp(last))];
        let asked = std::cell::RefCell::new(Vec::<Vec<String>>::new());
        let mut read = |keys: &[String]| -> Result<Vec<std::result::Result<Vec<u8>, String>>> {
            asked.borrow_mut().push(keys.to_vec());
            Ok(keys.iter().map(|k| if k == "2.jpg" { Err("gone".to_string()) } else { Ok(blobs(k.len() as u32)) }).collect())
        };
        let first = scan_blobs(listed(1), Some(&memo), false, 2, &mut read).unwrap();
        // Sorted as the keys' components sort, read two at a time; the failed read is a row without a stamp.
        assert_eq!(items(&first).iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), ["1.jpg", "10.jpg", "2.jpg"]);
        assert_eq!(items(&first)[1].size, Ok((6, 12)));
        assert!(items(&first)[2].size.as_ref().unwrap_err().contains("cannot read `2.jpg`: gone"));
        assert_eq!(items(&first)[2].stamp, Stamp::default());
        write_memo(&memo, &first, later()).unwrap();
        let again = scan_blobs(listed(1), Some(&memo), false, 2, &mut read).unwrap();
        let changed = scan_blobs(listed(99), Some(&memo), false, 2, &mut read).unwrap();
        assert_eq!((again.read_count(), changed.read_count()), (1, 2));
        assert_eq!(*asked.borrow(), [vec!["1.jpg", "10.jpg"], vec!["2.jpg"], vec!["2.jpg"], vec!["1.jpg", "2.jpg"]]);
        let twice = vec![("a".to_string(), stamp(1)), ("a".to_string(), stamp(1))];
        let Err(twice) = scan_blobs(twice, None, false, 2, &mut read) else { panic!("a key listed twice was taken") };
        assert!(twice.to_string().contains("`a` twice"), "{twice}");
    }

    /// A memo time past the racy window of files written now (their ctime cannot be dated back), as a memo written
    /// at a later start would have.
    fn later() -> i64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
        now + 2 * RACY_WINDOW_NS
    }
}
