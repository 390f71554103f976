//! An inventory's rows as one byte buffer, laid out as the scan memo file: a scan builds it in memory and writes
//! it as the memo; a restart reads the memo where it lies (mapped), and so do the other ranks of a machine once its
//! first rank has confirmed or rewritten the memo in the same start. One copy per machine, no string per image.
//!
//! Layout, little-endian: a 64-byte header (magic, time, image count, other-file count, count of names that are not
//! UTF-8, blob length), one 128-byte row per image, a 16-byte reference (blob offset, length) per other file and per
//! name that is not UTF-8, the blob of every string, and a CRC-32 of everything before it.
use crate::error::{CacheError, Result};
use crate::inventory::{Caption, Item, Stamp};
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Bump when the layout changes: an older memo is then ignored (read as no memo), never misread.
const MAGIC: &[u8; 8] = b"LCMINV04";
const HEADER: usize = 64;
const ROW: usize = 128;
const REF: usize = 16;

// Fields of a row, by byte offset: three strings (key, header error, caption text or error) as blob references,
// the sizes, both stamps and the content hash.
const KEY_AT: usize = 0; // u64 offset, u32 length
const SIZE_TAG: usize = 12; // 0: sized, 1: header error
const CAPTION_TAG: usize = 13; // 0: not read, 1: missing, 2: text, 3: unreadable
const WIDTH: usize = 16;
const HEIGHT: usize = 20;
const WHY_AT: usize = 24; // u64 offset, then its u32 length at WHY_LEN
const WHY_LEN: usize = 32;
const CAPTION_LEN: usize = 36;
const CAPTION_AT: usize = 40;
const STAMP: usize = 48;
const CAPTION_STAMP: usize = 80;
const CONTENT: usize = 112;

/// A caption as the rows hold it (borrowed from the buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionRef<'a> {
    /// The strategy reads no caption file.
    NotRead,
    /// No such file.
    Missing,
    /// The file's text and its stamp.
    Text(Stamp, &'a str),
    /// The file exists but cannot be read (its stamp, the reason).
    Unreadable(Stamp, &'a str),
}

impl CaptionRef<'_> {
    /// The owned caption.
    pub fn to_owned(self) -> Caption {
        match self {
            CaptionRef::NotRead => Caption::NotRead,
            CaptionRef::Missing => Caption::Missing,
            CaptionRef::Text(stamp, text) => Caption::Text(stamp, text.to_string()),
            CaptionRef::Unreadable(stamp, why) => Caption::Unreadable(stamp, why.to_string()),
        }
    }

    fn of(caption: &Caption) -> CaptionRef<'_> {
        match caption {
            Caption::NotRead => CaptionRef::NotRead,
            Caption::Missing => CaptionRef::Missing,
            Caption::Text(stamp, text) => CaptionRef::Text(*stamp, text),
            Caption::Unreadable(stamp, why) => CaptionRef::Unreadable(*stamp, why),
        }
    }
}

enum Bytes {
    Heap(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Heap(bytes) => bytes,
            Bytes::Mapped(map) => map,
        }
    }
}

/// Identity of a written memo: its time and CRC. Ranks compare it to know that the file they map is the one their
/// machine's first rank wrote or confirmed in this start.
pub type Token = (i64, u32);

/// The rows (header, rows, references and blob; a mapped memo also ends in its CRC).
pub struct Rows {
    bytes: Bytes,
    count: usize,
    others: usize,
    not_utf8: usize,
    blob: Range<usize>,
    /// Its memo's token when these rows are a memo file as it lies on disk.
    token: Option<Token>,
}

impl Rows {
    /// Images.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The memo's time (ns since the epoch) when these rows were read from one; 0 for rows built in memory.
    pub fn time(&self) -> i64 {
        i64_at(&self.bytes, 8)
    }

    /// The token of the memo these rows were read from, None when they were built in memory.
    pub fn token(&self) -> Option<Token> {
        self.token
    }

    fn row(&self, i: usize) -> &[u8] {
        let at = HEADER + i * ROW;
        &self.bytes[at..at + ROW]
    }

    fn text(&self, at: u64, len: u32) -> &str {
        let start = self.blob.start + at as usize;
        // Checked when the rows were made (built from strings, or a memo validated on reading).
        std::str::from_utf8(&self.bytes[start..start + len as usize]).unwrap_or_default()
    }

    /// Path of image `i` relative to the folder, '/'-separated.
    pub fn key(&self, i: usize) -> &str {
        let row = self.row(i);
        self.text(u64_at(row, KEY_AT), u32_at(row, KEY_AT + 8))
    }

    /// Stamp of image `i`'s file.
    pub fn stamp(&self, i: usize) -> Stamp {
        stamp_at(self.row(i), STAMP)
    }

    /// Oriented (W, H) of image `i`, or why its header could not be read.
    pub fn size(&self, i: usize) -> std::result::Result<(u32, u32), &str> {
        let row = self.row(i);
        match row[SIZE_TAG] {
            0 => Ok((u32_at(row, WIDTH), u32_at(row, HEIGHT))),
            _ => Err(self.text(u64_at(row, WHY_AT), u32_at(row, WHY_LEN))),
        }
    }

    /// 128-bit xxh3 of image `i`'s bytes.
    pub fn content(&self, i: usize) -> u128 {
        u128::from_le_bytes(self.row(i)[CONTENT..CONTENT + 16].try_into().expect("16 bytes"))
    }

    /// Image `i`'s caption file.
    pub fn caption(&self, i: usize) -> CaptionRef<'_> {
        let row = self.row(i);
        let text = || self.text(u64_at(row, CAPTION_AT), u32_at(row, CAPTION_LEN));
        match row[CAPTION_TAG] {
            0 => CaptionRef::NotRead,
            1 => CaptionRef::Missing,
            2 => CaptionRef::Text(stamp_at(row, CAPTION_STAMP), text()),
            _ => CaptionRef::Unreadable(stamp_at(row, CAPTION_STAMP), text()),
        }
    }

    fn reference(&self, j: usize) -> &[u8] {
        let at = HEADER + self.count * ROW + j * REF;
        let start = self.blob.start + u64_at(&self.bytes, at) as usize;
        &self.bytes[start..start + u64_at(&self.bytes, at + 8) as usize]
    }

    /// Keys of the listed files that are not images read here.
    pub fn others(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.others).map(|j| std::str::from_utf8(self.reference(j)).unwrap_or_default())
    }

    /// Paths whose names are not UTF-8 (raw bytes).
    pub fn not_utf8(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.not_utf8).map(|j| self.reference(self.others + j))
    }

    /// Image `i` as an owned item (`read` false).
    pub fn item(&self, i: usize) -> Item {
        Item {
            key: self.key(i).to_string(),
            stamp: self.stamp(i),
            size: self.size(i).map_err(str::to_string),
            content: self.content(i),
            caption: self.caption(i).to_owned(),
            read: false,
        }
    }

    /// Writes these rows as the memo at `path` with creation time `time`, atomically (a temp file named by this
    /// process: ranks or machines may write the same memo). Returns the memo's token.
    pub fn write(&self, path: &Path, time: i64) -> Result<Token> {
        let body_end = self.blob.end;
        let mut header = self.bytes[..HEADER].to_vec();
        header[8..16].copy_from_slice(&time.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(&self.bytes[HEADER..body_end]);
        let crc = crc.finalize();
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written = fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&header)?;
            f.write_all(&self.bytes[HEADER..body_end])?;
            f.write_all(&crc.to_le_bytes())?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
            let _ = fs::remove_file(&tmp);
            return Err(CacheError::io(path, e));
        }
        Ok((time, crc))
    }

    /// The memo at `path`, mapped, if its token passes `wanted` (read from the header and the trailing CRC before
    /// the whole file is checked); None for a missing, foreign, older, truncated or corrupt file, or an unwanted one
    /// (a fresh scan is then the only safe answer). Every string is checked here, once.
    pub fn open_if(path: &Path, wanted: impl Fn(Token) -> bool) -> Result<Option<Rows>> {
        let file = match fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io(path, e)),
        };
        // SAFETY: memos are replaced by rename, never written in place, so the mapped file does not change under
        // the map; a file too short for its header is refused before anything is read past its end.
        let map = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(map) => map,
            Err(_) => return Ok(None),
        };
        Ok(Rows::validated(map, wanted))
    }

    fn validated(map: memmap2::Mmap, wanted: impl Fn(Token) -> bool) -> Option<Rows> {
        if map.len() < HEADER + 4 || &map[..8] != MAGIC {
            return None;
        }
        let body_end = map.len() - 4;
        let crc = u32::from_le_bytes(map[body_end..].try_into().ok()?);
        if !wanted((i64_at(&map, 8), crc)) || crc32fast::hash(&map[..body_end]) != crc {
            return None;
        }
        let count = usize::try_from(u64_at(&map, 16)).ok()?;
        let others = usize::try_from(u64_at(&map, 24)).ok()?;
        let not_utf8 = usize::try_from(u64_at(&map, 32)).ok()?;
        let blob_len = usize::try_from(u64_at(&map, 40)).ok()?;
        let blob_start = count.checked_mul(ROW)?.checked_add(others.checked_add(not_utf8)?.checked_mul(REF)?)?.checked_add(HEADER)?;
        if blob_start.checked_add(blob_len)? != body_end {
            return None;
        }
        let token = Some((i64_at(&map, 8), crc));
        let rows = Rows { bytes: Bytes::Mapped(map), count, others, not_utf8, blob: blob_start..body_end, token };
        rows.strings_are_sound().then_some(rows)
    }

    /// Whether every reference lies inside the blob, every tag is known and every string but a non-UTF-8 name is
    /// UTF-8.
    fn strings_are_sound(&self) -> bool {
        let blob = &self.bytes[self.blob.clone()];
        let text = |at: u64, len: u64| {
            let start = usize::try_from(at).ok();
            let end = start.and_then(|s| s.checked_add(usize::try_from(len).ok()?));
            match (start, end) {
                (Some(start), Some(end)) if end <= blob.len() => Some(&blob[start..end]),
                _ => None,
            }
        };
        let utf8 = |at: u64, len: u64| text(at, len).is_some_and(|bytes| std::str::from_utf8(bytes).is_ok());
        let rows_sound = (0..self.count).all(|i| {
            let row = self.row(i);
            utf8(u64_at(row, KEY_AT), u32_at(row, KEY_AT + 8) as u64)
                && match row[SIZE_TAG] {
                    0 => true,
                    1 => utf8(u64_at(row, WHY_AT), u32_at(row, WHY_LEN) as u64),
                    _ => false,
                }
                && match row[CAPTION_TAG] {
                    0 | 1 => true,
                    2 | 3 => utf8(u64_at(row, CAPTION_AT), u32_at(row, CAPTION_LEN) as u64),
                    _ => false,
                }
        });
        let reference = |j: usize| {
            let at = HEADER + self.count * ROW + j * REF;
            (u64_at(&self.bytes, at), u64_at(&self.bytes, at + 8))
        };
        rows_sound
            && (0..self.others).all(|j| {
                let (at, len) = reference(j);
                utf8(at, len)
            })
            && (self.others..self.others + self.not_utf8).all(|j| {
                let (at, len) = reference(j);
                text(at, len).is_some()
            })
    }
}

/// Rows made one image at a time, in the inventory's order.
pub struct RowsBuilder {
    rows: Vec<u8>,
    blob: Vec<u8>,
    count: usize,
}

impl RowsBuilder {
    /// A builder for about `count` images.
    pub fn with_capacity(count: usize) -> RowsBuilder {
        RowsBuilder { rows: Vec::with_capacity(count * ROW), blob: Vec::with_capacity(count * 64), count: 0 }
    }

    fn put_text(&mut self, row: &mut [u8; ROW], at: usize, len_at: usize, text: &str) {
        row[at..at + 8].copy_from_slice(&(self.blob.len() as u64).to_le_bytes());
        row[len_at..len_at + 4].copy_from_slice(&(text.len() as u32).to_le_bytes());
        self.blob.extend_from_slice(text.as_bytes());
    }

    /// Appends one image.
    pub fn push(&mut self, key: &str, stamp: Stamp, size: std::result::Result<(u32, u32), &str>, content: u128, caption: CaptionRef<'_>) {
        let mut row = [0u8; ROW];
        self.put_text(&mut row, KEY_AT, KEY_AT + 8, key);
        match size {
            Ok((w, h)) => {
                row[WIDTH..WIDTH + 4].copy_from_slice(&w.to_le_bytes());
                row[HEIGHT..HEIGHT + 4].copy_from_slice(&h.to_le_bytes());
            }
            Err(why) => {
                row[SIZE_TAG] = 1;
                self.put_text(&mut row, WHY_AT, WHY_LEN, why);
            }
        }
        let (tag, caption_stamp, text) = match caption {
            CaptionRef::NotRead => (0, Stamp::default(), None),
            CaptionRef::Missing => (1, Stamp::default(), None),
            CaptionRef::Text(stamp, text) => (2, stamp, Some(text)),
            CaptionRef::Unreadable(stamp, why) => (3, stamp, Some(why)),
        };
        row[CAPTION_TAG] = tag;
        if let Some(text) = text {
            self.put_text(&mut row, CAPTION_AT, CAPTION_LEN, text);
        }
        put_stamp(&mut row, STAMP, stamp);
        put_stamp(&mut row, CAPTION_STAMP, caption_stamp);
        row[CONTENT..CONTENT + 16].copy_from_slice(&content.to_le_bytes());
        self.rows.extend_from_slice(&row);
        self.count += 1;
    }

    /// Appends a scanned item.
    pub fn push_item(&mut self, item: &Item) {
        self.push(&item.key, item.stamp, item.size.as_ref().map(|&s| s).map_err(String::as_str), item.content, CaptionRef::of(&item.caption));
    }

    /// Appends image `i` of `rows` as it is there.
    pub fn push_row(&mut self, rows: &Rows, i: usize) {
        self.push(rows.key(i), rows.stamp(i), rows.size(i), rows.content(i), rows.caption(i));
    }

    /// The rows, with the keys of the other listed files and the names that are not UTF-8.
    pub fn finish<'a>(mut self, others: impl IntoIterator<Item = &'a str>, not_utf8: impl IntoIterator<Item = &'a [u8]>) -> Rows {
        let mut references = Vec::new();
        let mut refer = |blob: &mut Vec<u8>, bytes: &[u8]| {
            references.extend_from_slice(&(blob.len() as u64).to_le_bytes());
            references.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            blob.extend_from_slice(bytes);
        };
        let others: usize = others.into_iter().map(|key| refer(&mut self.blob, key.as_bytes())).count();
        let not_utf8: usize = not_utf8.into_iter().map(|name| refer(&mut self.blob, name)).count();
        let mut bytes = Vec::with_capacity(HEADER + self.rows.len() + references.len() + self.blob.len() + 4);
        bytes.extend_from_slice(MAGIC);
        for field in [0, self.count as u64, others as u64, not_utf8 as u64, self.blob.len() as u64] {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        bytes.resize(HEADER, 0);
        bytes.extend_from_slice(&self.rows);
        bytes.extend_from_slice(&references);
        let blob_start = bytes.len();
        bytes.extend_from_slice(&self.blob);
        let blob = blob_start..bytes.len();
        Rows { bytes: Bytes::Heap(bytes), count: self.count, others, not_utf8, blob, token: None }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn i64_at(bytes: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn stamp_at(row: &[u8], at: usize) -> Stamp {
    Stamp { size: u64_at(row, at), mtime_ns: i64_at(row, at + 8), ctime_ns: i64_at(row, at + 16), inode: u64_at(row, at + 24) }
}

fn put_stamp(row: &mut [u8; ROW], at: usize, stamp: Stamp) {
    row[at..at + 8].copy_from_slice(&stamp.size.to_le_bytes());
    row[at + 8..at + 16].copy_from_slice(&stamp.mtime_ns.to_le_bytes());
    row[at + 16..at + 24].copy_from_slice(&stamp.ctime_ns.to_le_bytes());
    row[at + 24..at + 32].copy_from_slice(&stamp.inode.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> Vec<Item> {
        let stamp = |n: i64| Stamp { size: n as u64, mtime_ns: n * 10, ctime_ns: n * 11 - 5, inode: u64::MAX - n as u64 };
        vec![
            Item { key: "a/é b.png".into(), stamp: stamp(1), size: Ok((3, u32::MAX)), content: u128::MAX - 7, caption: Caption::Text(stamp(2), "a cat\r\nline two".into()), read: true },
            Item { key: "broken.png".into(), stamp: stamp(3), size: Err("cannot read `broken.png`: bad".into()), content: 0, caption: Caption::Missing, read: false },
            Item { key: "c.png".into(), stamp: stamp(4), size: Ok((0, 1)), content: 9, caption: Caption::Unreadable(stamp(5), "not UTF-8".into()), read: true },
            Item { key: "d".into(), stamp: Stamp::default(), size: Ok((1, 1)), content: 1, caption: Caption::NotRead, read: true },
            Item { key: String::new(), stamp: stamp(6), size: Ok((2, 2)), content: 2, caption: Caption::Text(stamp(7), String::new()), read: true },
        ]
    }

    fn built(items: &[Item]) -> Rows {
        let mut builder = RowsBuilder::with_capacity(1);
        items.iter().for_each(|item| builder.push_item(item));
        builder.finish(["x.mp4", "sub/y.MOV"], [b"bad\xffname".as_slice()])
    }

    fn owned(rows: &Rows) -> Vec<Item> {
        (0..rows.len()).map(|i| rows.item(i)).collect()
    }

    #[test]
    fn rows_built_written_and_mapped_hold_every_field() {
        let items = items();
        let rows = built(&items);
        let unread: Vec<Item> = items.iter().map(|i| Item { read: false, ..i.clone() }).collect();
        assert_eq!(owned(&rows), unread);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memo");
        let token = rows.write(&path, 1234).unwrap();
        let mapped = Rows::open_if(&path, |_| true).unwrap().unwrap();
        assert_eq!((mapped.time(), mapped.token()), (1234, Some(token)));
        assert_eq!(owned(&mapped), unread);
        assert_eq!(mapped.others().collect::<Vec<_>>(), ["x.mp4", "sub/y.MOV"]);
        assert_eq!(mapped.not_utf8().collect::<Vec<_>>(), [b"bad\xffname".as_slice()]);
        let mut copied = RowsBuilder::with_capacity(0);
        (0..mapped.len()).for_each(|i| copied.push_row(&mapped, i));
        assert_eq!(owned(&copied.finish([], [])), unread);
        // rewritten at another time: another token
        assert_ne!(rows.write(&path, 1235).unwrap(), token);
    }

    #[test]
    fn a_damaged_or_foreign_memo_is_no_memo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memo");
        assert!(Rows::open_if(&path, |_| true).unwrap().is_none());
        built(&items()).write(&path, 1).unwrap();
        let good = fs::read(&path).unwrap();
        for cut in [0, 8, HEADER, good.len() / 2, good.len() - 1] {
            fs::write(&path, &good[..cut]).unwrap();
            assert!(Rows::open_if(&path, |_| true).unwrap().is_none(), "cut at {cut}");
        }
        for flip in [9, HEADER + 3, good.len() / 2, good.len() - 2] {
            let mut bad = good.clone();
            bad[flip] ^= 1;
            fs::write(&path, &bad).unwrap();
            assert!(Rows::open_if(&path, |_| true).unwrap().is_none(), "flip at {flip}");
        }
        // a key reference past the blob, with a CRC that matches: refused by the checks, not read out of bounds
        let mut bad = good.clone();
        bad[HEADER + 8..HEADER + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        let body = bad.len() - 4;
        let crc = crc32fast::hash(&bad[..body]);
        bad[body..].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, &bad).unwrap();
        assert!(Rows::open_if(&path, |_| true).unwrap().is_none());
        let mut older = good.clone();
        older[..8].copy_from_slice(b"LCMINV03");
        fs::write(&path, &older).unwrap();
        assert!(Rows::open_if(&path, |_| true).unwrap().is_none());
    }
}
