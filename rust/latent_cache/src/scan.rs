//! Header-only size scan: width and height after EXIF orientation, without decoding pixels.
use crate::error::{CacheError, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Container formats the scan understands natively; others go through the `image` crate's header reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JPEG / JFIF / EXIF.
    Jpeg,
    /// PNG.
    Png,
    /// WebP (lossy, lossless or extended).
    Webp,
    /// GIF or BMP.
    Other,
}

/// What the header tells: stored size, EXIF orientation (1..=8) and format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Stored width in pixels (before orientation).
    pub width: u32,
    /// Stored height in pixels (before orientation).
    pub height: u32,
    /// EXIF orientation tag, 1 when absent.
    pub orientation: u16,
    /// Container format.
    pub format: Format,
}

impl Header {
    /// Size as displayed: orientations 5..=8 transpose the image (SimpleTuner's header-only discovery swaps too).
    pub fn oriented_size(&self) -> (u32, u32) {
        if (5..=8).contains(&self.orientation) {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// Bytes read up front: enough for the SOF of almost every JPEG and all PNG/WebP headers.
const FIRST_READ: usize = 16 * 1024;

/// Reads the header of the image file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let mut file = File::open(path).map_err(|e| CacheError::io(path, e))?;
    let mut head = Head { file: Some(&mut file), buf: Cow::Owned(Vec::with_capacity(FIRST_READ)), eof: false };
    head.fill(FIRST_READ).map_err(|e| CacheError::io(path, e))?;
    parse_header(path, &mut head)
}

/// Reads the header of an in-memory image (`path` only names it in errors).
pub fn header_from_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut head = Head { file: None, buf: Cow::Borrowed(bytes), eof: true };
    parse_header(path, &mut head)
}

fn parse_header(path: &Path, head: &mut Head<'_>) -> Result<Header> {
    let malformed = |why: &str| CacheError::decode(path, format!("malformed header: {why}"));
    let io = |e| CacheError::io(path, e);
    let magic = head.get(0, 12).map_err(io)?.map(<[u8]>::to_vec).unwrap_or_default();
    if magic.starts_with(&[0xFF, 0xD8]) {
        jpeg_header(head).map_err(io)?.ok_or_else(|| malformed("no jpeg frame header before end of data"))
    } else if magic.starts_with(b"\x89PNG\r\n\x1a\n") {
        png_header(head).map_err(io)?.ok_or_else(|| malformed("png ihdr missing or truncated"))
    } else if magic.len() == 12 && &magic[0..4] == b"RIFF" && &magic[8..12] == b"WEBP" {
        webp_header(head).map_err(io)?.ok_or_else(|| malformed("webp image chunk missing or truncated"))
    } else if magic.starts_with(b"GIF8") && magic.len() >= 10 {
        // Logical screen descriptor.
        let (width, height) = (u32::from(u16::from_le_bytes([magic[6], magic[7]])), u32::from(u16::from_le_bytes([magic[8], magic[9]])));
        sized(width, height, Format::Other).ok_or_else(|| malformed("gif with an empty screen"))
    } else if magic.starts_with(b"BM") {
        // BITMAPINFOHEADER: signed width/height at 18/22 (negative height = top-down rows).
        let d = head.get(18, 8).map_err(io)?.ok_or_else(|| malformed("bmp info header truncated"))?;
        let (w, h) = (i32::from_le_bytes([d[0], d[1], d[2], d[3]]), i32::from_le_bytes([d[4], d[5], d[6], d[7]]));
        sized(w.unsigned_abs(), h.unsigned_abs(), Format::Other).ok_or_else(|| malformed("bmp with an empty size"))
    } else {
        Err(CacheError::UnknownFormat { path: path.to_path_buf() })
    }
}

fn sized(width: u32, height: u32, format: Format) -> Option<Header> {
    (width > 0 && height > 0).then_some(Header { width, height, orientation: 1, format })
}

/// Scans many files in parallel; one result per path, in order.
pub fn scan_sizes(paths: &[PathBuf]) -> Vec<Result<(u32, u32)>> {
    paths
        .par_iter()
        .map(|p| {
            std::panic::catch_unwind(|| read_header(p).map(|h| h.oriented_size()))
                .unwrap_or_else(|_| Err(CacheError::decode(p, "header parser panicked")))
        })
        .collect()
}

/// A growing prefix of a file read on demand, or a whole in-memory image.
struct Head<'a> {
    file: Option<&'a mut dyn Read>,
    buf: Cow<'a, [u8]>,
    eof: bool,
}

impl Head<'_> {
    /// Reads until `want` bytes are buffered or the file ends; grows in steps of at most 1 MiB, so a bogus
    /// length in a header costs no more memory than the file has.
    fn fill(&mut self, want: usize) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let buf = self.buf.to_mut();
        while buf.len() < want && !self.eof {
            let start = buf.len();
            buf.resize(start + (want - start).clamp(4096, 1 << 20), 0);
            let n = file.read(&mut buf[start..])?;
            buf.truncate(start + n);
            self.eof = n == 0;
        }
        Ok(())
    }

    /// `len` bytes at `offset`, or `None` when the file is shorter.
    fn get(&mut self, offset: usize, len: usize) -> std::io::Result<Option<&[u8]>> {
        let end = offset.saturating_add(len);
        if end > self.buf.len() {
            self.fill(end.max(self.buf.len() * 2))?;
        }
        Ok(self.buf.get(offset..end))
    }

}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Walks JPEG segments up to the first SOF; picks up the EXIF orientation from APP1 on the way.
fn jpeg_header(head: &mut Head<'_>) -> std::io::Result<Option<Header>> {
    let mut pos = 2usize;
    let mut orientation = 1u16;
    loop {
        let Some(m) = head.get(pos, 2)? else { return Ok(None) };
        if m[0] != 0xFF {
            return Ok(None);
        }
        let marker = m[1];
        if marker == 0xFF {
            pos += 1; // fill byte
            continue;
        }
        if marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            pos += 2; // markers without a length
            continue;
        }
        let Some(l) = head.get(pos + 2, 2)? else { return Ok(None) };
        let len = usize::from(be16(l));
        if len < 2 {
            return Ok(None);
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            let Some(s) = head.get(pos + 4, 5)? else { return Ok(None) };
            let (height, width) = (u32::from(be16(&s[1..3])), u32::from(be16(&s[3..5])));
            if width == 0 || height == 0 {
                return Ok(None);
            }
            return Ok(Some(Header { width, height, orientation, format: Format::Jpeg }));
        }
        if marker == 0xDA || marker == 0xD9 {
            return Ok(None); // scan data before any frame header
        }
        if marker == 0xE1 {
            if let Some(seg) = head.get(pos + 4, len - 2)? {
                if seg.starts_with(b"Exif\0\0") {
                    orientation = tiff_orientation(&seg[6..]).unwrap_or(orientation);
                }
            }
        }
        pos += 2 + len;
    }
}

/// IHDR for the size; an eXIf chunk before IDAT for the orientation (what Pillow sees on open).
fn png_header(head: &mut Head<'_>) -> std::io::Result<Option<Header>> {
    let Some(ihdr) = head.get(8, 25)? else { return Ok(None) };
    if &ihdr[4..8] != b"IHDR" {
        return Ok(None);
    }
    let (width, height) = (be32(&ihdr[8..12]), be32(&ihdr[12..16]));
    if width == 0 || height == 0 {
        return Ok(None);
    }
    let mut orientation = 1u16;
    let mut pos = 33usize;
    while let Some(c) = head.get(pos, 8)? {
        let (len, kind) = (be32(&c[0..4]) as usize, [c[4], c[5], c[6], c[7]]);
        match &kind {
            b"IDAT" | b"IEND" => break,
            b"eXIf" => {
                if let Some(data) = head.get(pos + 8, len)? {
                    orientation = tiff_orientation(data).unwrap_or(1);
                }
                break;
            }
            _ => pos += 12 + len,
        }
    }
    Ok(Some(Header { width, height, orientation, format: Format::Png }))
}

/// VP8 / VP8L / VP8X size; the EXIF chunk (anywhere in the RIFF) for the orientation.
fn webp_header(head: &mut Head<'_>) -> std::io::Result<Option<Header>> {
    let mut pos = 12usize;
    let mut size = None;
    let mut has_exif = false;
    let mut orientation = 1u16;
    while let Some(c) = head.get(pos, 8)? {
        let (kind, len) = ([c[0], c[1], c[2], c[3]], le32(&c[4..8]) as usize);
        let body = pos + 8;
        match &kind {
            b"VP8X" => {
                let Some(d) = head.get(body, 10)? else { return Ok(None) };
                has_exif = d[0] & 0x08 != 0;
                let w = 1 + (u32::from(d[4]) | u32::from(d[5]) << 8 | u32::from(d[6]) << 16);
                let h = 1 + (u32::from(d[7]) | u32::from(d[8]) << 8 | u32::from(d[9]) << 16);
                size = Some((w, h));
                if !has_exif {
                    break;
                }
            }
            b"VP8 " if size.is_none() => {
                let Some(d) = head.get(body, 10)? else { return Ok(None) };
                if d[3..6] != [0x9D, 0x01, 0x2A] {
                    return Ok(None);
                }
                size = Some((u32::from(u16::from_le_bytes([d[6], d[7]]) & 0x3FFF), u32::from(u16::from_le_bytes([d[8], d[9]]) & 0x3FFF)));
                break;
            }
            b"VP8L" if size.is_none() => {
                let Some(d) = head.get(body, 5)? else { return Ok(None) };
                if d[0] != 0x2F {
                    return Ok(None);
                }
                let bits = le32(&d[1..5]);
                size = Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1));
                break;
            }
            b"EXIF" if has_exif => {
                if let Some(d) = head.get(body, len)? {
                    let d = d.strip_prefix(b"Exif\0\0").unwrap_or(d);
                    orientation = tiff_orientation(d).unwrap_or(1);
                }
                break;
            }
            _ => {}
        }
        pos = body + len + (len & 1);
    }
    Ok(size.filter(|&(w, h)| w > 0 && h > 0).map(|(width, height)| Header { width, height, orientation, format: Format::Webp }))
}

/// Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; `None` when absent or malformed.
pub(crate) fn tiff_orientation(tiff: &[u8]) -> Option<u16> {
    let little = match tiff.get(0..2)? {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let u16_at = |o: usize| tiff.get(o..o + 2).map(|b| if little { u16::from_le_bytes([b[0], b[1]]) } else { be16(b) });
    let u32_at = |o: usize| {
        tiff.get(o..o + 4).map(|b| if little { u32::from_le_bytes([b[0], b[1], b[2], b[3]]) } else { be32(b) })
    };
    let ifd = u32_at(4)? as usize;
    let count = usize::from(u16_at(ifd)?);
    (0..count).find_map(|i| {
        let entry = ifd + 2 + 12 * i;
        (u16_at(entry)? == 0x0112).then(|| u16_at(entry + 8)).flatten()
    }).filter(|o| (1..=8).contains(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exif_tiff(orientation: u16, little: bool) -> Vec<u8> {
        let mut t = Vec::new();
        let w16 = |t: &mut Vec<u8>, v: u16| t.extend(if little { v.to_le_bytes() } else { v.to_be_bytes() });
        let w32 = |t: &mut Vec<u8>, v: u32| t.extend(if little { v.to_le_bytes() } else { v.to_be_bytes() });
        t.extend(if little { b"II" } else { b"MM" });
        w16(&mut t, 42);
        w32(&mut t, 8);
        w16(&mut t, 1);
        w16(&mut t, 0x0112);
        w16(&mut t, 3);
        w32(&mut t, 1);
        w16(&mut t, orientation);
        w16(&mut t, 0);
        w32(&mut t, 0);
        t
    }

    fn jpeg_with(orientation: Option<u16>, w: u16, h: u16) -> Vec<u8> {
        let mut j = vec![0xFF, 0xD8];
        if let Some(o) = orientation {
            let mut seg = b"Exif\0\0".to_vec();
            seg.extend(exif_tiff(o, false));
            j.extend([0xFF, 0xE1]);
            j.extend(((seg.len() + 2) as u16).to_be_bytes());
            j.extend(seg);
        }
        j.extend([0xFF, 0xC0, 0, 11, 8]);
        j.extend(h.to_be_bytes());
        j.extend(w.to_be_bytes());
        j.extend([1, 1, 0x11, 0]);
        j
    }

    #[test]
    fn orientation_six_swaps_width_and_height() {
        let h = header_from_bytes(Path::new("a.jpg"), &jpeg_with(Some(6), 300, 200)).unwrap();
        assert_eq!((h.width, h.height, h.orientation), (300, 200, 6));
        assert_eq!(h.oriented_size(), (200, 300));
        let h = header_from_bytes(Path::new("a.jpg"), &jpeg_with(Some(3), 300, 200)).unwrap();
        assert_eq!(h.oriented_size(), (300, 200));
        let h = header_from_bytes(Path::new("a.jpg"), &jpeg_with(None, 300, 200)).unwrap();
        assert_eq!(h.orientation, 1);
    }

    #[test]
    fn little_endian_exif_is_read() {
        assert_eq!(tiff_orientation(&exif_tiff(8, true)), Some(8));
        assert_eq!(tiff_orientation(b"garbage"), None);
    }

    #[test]
    fn truncated_jpeg_is_an_error_naming_the_file() {
        let bytes = &jpeg_with(None, 300, 200)[..6];
        let err = header_from_bytes(Path::new("t.jpg"), bytes).unwrap_err();
        assert!(err.to_string().contains("`t.jpg`"), "{err}");
    }

    #[test]
    fn huge_chunk_lengths_do_not_allocate() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x05\0\0\0\x07\x08\x02\0\0\0\0\0\0\0".to_vec();
        png.extend([0xFF, 0xFF, 0xFF, 0xF0]);
        png.extend(b"eXIf");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        std::fs::write(&path, &png).unwrap();
        let h = read_header(&path).unwrap();
        assert_eq!((h.width, h.height, h.orientation), (5, 7, 1));
    }

    #[test]
    fn gif_header_is_read() {
        let gif = b"GIF89a\x03\0\x02\0\0\0\0;";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gif");
        std::fs::write(&path, gif).unwrap();
        assert_eq!(read_header(&path).unwrap().oriented_size(), (3, 2));
    }

    #[test]
    fn unknown_bytes_are_rejected() {
        let err = header_from_bytes(Path::new("x.txt"), b"hello world, not an image").unwrap_err();
        assert!(matches!(err, CacheError::UnknownFormat { .. }));
    }
}
