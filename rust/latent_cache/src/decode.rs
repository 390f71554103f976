//! Batch decode → RGB → orient → antialiased resize → crop, into one contiguous `[N, H, W, 3]` buffer.
use crate::error::{CacheError, Result};
use crate::scan::{header_from_bytes, Format, Header};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rayon::prelude::*;
use std::path::Path;
use zune_core::bytestream::{ZByteIoError, ZSeekFrom};

/// Pillow's `DecompressionBombError` threshold (2 × `Image.MAX_IMAGE_PIXELS`).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Geometry of one image: resize the oriented image to `resize` (W, H), then cut `target` at `crop` (top, left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// (W, H) the whole oriented image is resized to.
    pub resize: (u32, u32),
    /// (top, left) of the crop inside the resized image.
    pub crop: (u32, u32),
}

/// Result of a batch: rows of `target` RGB pixels for the images that decoded, in input order.
pub struct Batch {
    /// `ok.len() * H * W * 3` bytes.
    pub pixels: Vec<u8>,
    /// Input indices of the rows.
    pub ok: Vec<usize>,
    /// Input index and error of each image that failed.
    pub errors: Vec<(usize, CacheError)>,
}

/// Where an image comes from.
pub enum Source<'a> {
    /// A file on disk.
    Path(&'a Path),
    /// Encoded bytes in memory; the path only names it in messages.
    Bytes(&'a Path, &'a [u8]),
    /// Encoded bytes decoded as stored, their EXIF orientation not applied: SimpleTuner's remote backends (S3)
    /// decode an object that way, and bucket it by its stored size.
    StoredBytes(&'a Path, &'a [u8]),
}

/// Decodes every source in parallel (on the current rayon pool) into one buffer of `target` (W, H) crops.
pub fn decode_batch(sources: &[Source<'_>], geometry: &[Geometry], target: (u32, u32), max_pixels: u64) -> Batch {
    let frame = target.0 as usize * target.1 as usize * 3;
    let mut pixels = vec![0u8; frame * sources.len()];
    let results: Vec<Result<()>> = pixels
        .par_chunks_mut(frame.max(1))
        .zip(sources.par_iter().zip(geometry.par_iter()))
        .map(|(out, (src, geo))| {
            // A panic inside a third-party decoder becomes this file's error instead of tearing down the batch.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_source(src, *geo, target, max_pixels, out)))
                .unwrap_or_else(|_| Err(CacheError::decode(src.path(), "decoder panicked")))
        })
        .collect();
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(()) => {
                // Compact: successful rows move down over failed ones.
                if ok.len() != i {
                    pixels.copy_within(i * frame..(i + 1) * frame, ok.len() * frame);
                }
                ok.push(i);
            }
            Err(e) => errors.push((i, e)),
        }
    }
    pixels.truncate(ok.len() * frame);
    Batch { pixels, ok, errors }
}

impl Source<'_> {
    /// The path naming this source in messages.
    pub fn path(&self) -> &Path {
        match self {
            Source::Path(p) | Source::Bytes(p, _) | Source::StoredBytes(p, _) => p,
        }
    }
}

fn decode_source(src: &Source<'_>, geo: Geometry, target: (u32, u32), max_pixels: u64, out: &mut [u8]) -> Result<()> {
    match src {
        Source::Path(p) => {
            let bytes = std::fs::read(p).map_err(|e| CacheError::io(p, e))?;
            decode_into(p, &bytes, geo, target, max_pixels, out)
        }
        Source::Bytes(p, bytes) => decode_into(p, bytes, geo, target, max_pixels, out),
        Source::StoredBytes(p, bytes) => decode_as_stored(p, bytes, geo, target, max_pixels, out),
    }
}

/// Decodes one encoded image into `out` (`target` W × H × 3, zero where the crop leaves the image, like Pillow).
pub fn decode_into(path: &Path, bytes: &[u8], geo: Geometry, target: (u32, u32), max_pixels: u64, out: &mut [u8]) -> Result<()> {
    decode_header_into(path, bytes, header_from_bytes(path, bytes)?, geo, target, max_pixels, out)
}

/// `decode_into` without applying the image's EXIF orientation.
pub fn decode_as_stored(path: &Path, bytes: &[u8], geo: Geometry, target: (u32, u32), max_pixels: u64, out: &mut [u8]) -> Result<()> {
    let header = Header { orientation: 1, ..header_from_bytes(path, bytes)? };
    decode_header_into(path, bytes, header, geo, target, max_pixels, out)
}

fn decode_header_into(
    path: &Path,
    bytes: &[u8],
    header: Header,
    geo: Geometry,
    target: (u32, u32),
    max_pixels: u64,
    out: &mut [u8],
) -> Result<()> {
    if u64::from(header.width) * u64::from(header.height) > max_pixels {
        return Err(CacheError::TooManyPixels {
            path: path.to_path_buf(),
            width: header.width,
            height: header.height,
            limit: max_pixels,
        });
    }
    if geo.resize.0 == 0 || geo.resize.1 == 0 {
        return Err(CacheError::config("resize_size", format!("empty resize size for `{}`", path.display())));
    }
    let rgb = decode_rgb(path, bytes, &header, geo.resize)?;
    let rgb = orient(rgb, header.orientation);
    let result = resize_crop(path, &rgb, geo, target, out);
    SCRATCH.set(rgb.data);
    result
}

thread_local! {
    /// Decoded-pixel buffer reused across the images one worker decodes (saves a large allocation and its page
    /// faults per image).
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    /// Resampler with its coefficient buffers, reused likewise.
    static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
}

/// An RGB8 image.
pub struct Rgb {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

/// Decodes to RGB8 the way SimpleTuner's `load_image` ends up: grey replicated, palette expanded, 16-bit
/// scaled to 8 bits, alpha dropped (trainingsample's `rgba_to_rgb_optimized` keeps the colour channels), CMYK
/// converted. JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when that still covers `resize`.
fn decode_rgb(path: &Path, bytes: &[u8], header: &Header, resize: (u32, u32)) -> Result<Rgb> {
    if header.format == Format::Jpeg {
        let stored = if (5..=8).contains(&header.orientation) { (resize.1, resize.0) } else { resize };
        // Keep at least 2× the output size so the Lanczos filter still does the final antialiasing.
        let wanted = (stored.0.saturating_mul(2), stored.1.saturating_mul(2));
        if wanted.0 <= header.width / 2 && wanted.1 <= header.height / 2 {
            return decode_jpeg_scaled(path, bytes, wanted);
        }
        return decode_jpeg(path, bytes, header);
    }
    let img = image::load_from_memory(bytes).map_err(|e| CacheError::decode(path, e))?;
    let (width, height) = (img.width(), img.height());
    Ok(Rgb { width, height, data: img.into_rgb8().into_raw() })
}

fn decode_jpeg(path: &Path, bytes: &[u8], header: &Header) -> Result<Rgb> {
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(header.width as usize)
        .set_max_height(header.height as usize)
        .set_strict_mode(false);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(SliceReader::new(bytes), options);
    let fail = |e: zune_jpeg::errors::DecodeErrors| CacheError::decode(path, format!("{e:?}"));
    decoder.decode_headers().map_err(fail)?;
    let info = decoder.info().ok_or_else(|| CacheError::decode(path, "no frame header"))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    let mut data = SCRATCH.take();
    data.resize(decoder.output_buffer_size().ok_or_else(|| CacheError::decode(path, "no frame header"))?, 0);
    decoder.decode_into(&mut data).map_err(fail)?;
    let channels = data.len() / (width as usize * height as usize).max(1);
    let data = match channels {
        3 => data,
        1 => data.iter().flat_map(|&v| [v, v, v]).collect(),
        _ => return Err(CacheError::decode(path, format!("unexpected {channels} channels"))),
    };
    if data.len() < width as usize * height as usize * 3 {
        return Err(CacheError::decode(path, "truncated pixel data"));
    }
    Ok(Rgb { width, height, data })
}

fn decode_jpeg_scaled(path: &Path, bytes: &[u8], wanted: (u32, u32)) -> Result<Rgb> {
    use jpeg_decoder::PixelFormat;
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    let clamp16 = |v: u32| v.min(u32::from(u16::MAX)) as u16;
    let (w, h) = decoder
        .scale(clamp16(wanted.0), clamp16(wanted.1))
        .map_err(|e| CacheError::decode(path, e))?;
    let data = decoder.decode().map_err(|e| CacheError::decode(path, e))?;
    let info = decoder.info().ok_or_else(|| CacheError::decode(path, "no frame header"))?;
    let (width, height) = (u32::from(w), u32::from(h));
    let n = width as usize * height as usize;
    let data: Vec<u8> = match info.pixel_format {
        PixelFormat::RGB24 => data,
        PixelFormat::L8 => data.iter().flat_map(|&v| [v, v, v]).collect(),
        PixelFormat::L16 => data.chunks_exact(2).flat_map(|c| [c[0]; 3]).collect(),
        PixelFormat::CMYK32 => data.chunks_exact(4).flat_map(|c| cmyk_to_rgb(c[0], c[1], c[2], c[3])).collect(),
    };
    if data.len() < n * 3 {
        return Err(CacheError::decode(path, "truncated pixel data"));
    }
    Ok(Rgb { width, height, data })
}

/// zune-jpeg's input over a byte slice.
///
/// zune-core's own `ZCursor` reaches zune-jpeg through its blanket `BufRead + Seek` implementation, so each
/// 4-byte refill of the entropy decoder becomes an `io::Read::read` with a runtime-length `memcpy` call; here the
/// fixed-size reads inline to plain loads (about a quarter less time per JPEG). The semantics are that path's:
/// a read past the end fails (or, for a single byte, yields 0) and leaves the position where it was.
struct SliceReader<'a> {
    data: &'a [u8],
    position: usize,
}

impl<'a> SliceReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, position: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.data.get(self.position..).unwrap_or(&[])
    }
}

impl zune_core::bytestream::ZByteReaderTrait for SliceReader<'_> {
    #[inline(always)]
    fn read_byte_no_error(&mut self) -> u8 {
        match self.data.get(self.position) {
            Some(&byte) => {
                self.position += 1;
                byte
            }
            None => 0,
        }
    }

    #[inline(always)]
    fn read_exact_bytes(&mut self, buf: &mut [u8]) -> std::result::Result<(), ZByteIoError> {
        self.peek_exact_bytes(buf)?;
        self.position += buf.len();
        Ok(())
    }

    #[inline(always)]
    fn read_bytes(&mut self, buf: &mut [u8]) -> std::result::Result<usize, ZByteIoError> {
        let count = self.peek_bytes(buf)?;
        self.position += count;
        Ok(count)
    }

    #[inline(always)]
    fn peek_bytes(&mut self, buf: &mut [u8]) -> std::result::Result<usize, ZByteIoError> {
        let rest = self.rest();
        let count = rest.len().min(buf.len());
        buf[..count].copy_from_slice(&rest[..count]);
        Ok(count)
    }

    #[inline(always)]
    fn peek_exact_bytes(&mut self, buf: &mut [u8]) -> std::result::Result<(), ZByteIoError> {
        let rest = self.rest();
        match rest.get(..buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(ZByteIoError::NotEnoughBytes(rest.len(), buf.len())),
        }
    }

    fn z_seek(&mut self, from: ZSeekFrom) -> std::result::Result<u64, ZByteIoError> {
        let (base, offset) = match from {
            ZSeekFrom::Start(n) => {
                self.position = usize::try_from(n).map_err(ZByteIoError::from)?;
                return Ok(n);
            }
            ZSeekFrom::End(n) => (self.data.len(), n),
            ZSeekFrom::Current(n) => (self.position, n),
        };
        let offset = isize::try_from(offset).map_err(ZByteIoError::from)?;
        self.position = base.checked_add_signed(offset).ok_or(ZByteIoError::SeekError("negative seek"))?;
        Ok(self.position as u64)
    }

    #[inline(always)]
    fn is_eof(&mut self) -> std::result::Result<bool, ZByteIoError> {
        Ok(self.position >= self.data.len())
    }

    #[inline(always)]
    fn z_position(&mut self) -> std::result::Result<u64, ZByteIoError> {
        Ok(self.position as u64)
    }

    fn read_remaining(&mut self, sink: &mut Vec<u8>) -> std::result::Result<usize, ZByteIoError> {
        let rest = self.rest();
        sink.extend_from_slice(rest);
        self.position += rest.len();
        Ok(rest.len())
    }
}

/// Adobe-style (inverted) CMYK as stored by jpeg-decoder, to RGB.
fn cmyk_to_rgb(c: u8, m: u8, y: u8, k: u8) -> [u8; 3] {
    let f = |v: u8| ((u16::from(v) * u16::from(k) + 127) / 255) as u8;
    [f(c), f(m), f(y)]
}

/// Applies an EXIF orientation (1..=8), as Pillow's `exif_transpose` does.
pub fn orient(img: Rgb, orientation: u16) -> Rgb {
    if !(2..=8).contains(&orientation) {
        return img;
    }
    let buf = image::RgbImage::from_raw(img.width, img.height, img.data).expect("buffer sized by decoder");
    use image::imageops::{flip_horizontal, flip_vertical, rotate180, rotate270, rotate90};
    let out = match orientation {
        2 => flip_horizontal(&buf),
        3 => rotate180(&buf),
        4 => flip_vertical(&buf),
        5 => flip_horizontal(&rotate90(&buf)),
        6 => rotate90(&buf),
        7 => flip_horizontal(&rotate270(&buf)),
        _ => rotate270(&buf),
    };
    Rgb { width: out.width(), height: out.height(), data: out.into_raw() }
}

/// Lanczos-3 resize of `rgb` to `geo.resize`, keeping only the `target` window at `geo.crop`; only the window
/// is computed (the source region it maps to is resampled directly).
fn resize_crop(path: &Path, rgb: &Rgb, geo: Geometry, target: (u32, u32), out: &mut [u8]) -> Result<()> {
    let (rw, rh) = geo.resize;
    let (top, left) = geo.crop;
    // Part of the target window inside the resized image; the rest stays black, as Pillow's crop pads.
    let win_w = target.0.min(rw.saturating_sub(left));
    let win_h = target.1.min(rh.saturating_sub(top));
    if (win_w, win_h) != target {
        out.fill(0);
    }
    if win_w == 0 || win_h == 0 {
        return Ok(());
    }
    let err = |e: &dyn std::fmt::Display| CacheError::decode(path, format!("resize failed: {e}"));
    let src = ImageRef::new(rgb.width, rgb.height, &rgb.data, PixelType::U8x3).map_err(|e| err(&e))?;
    let (sx, sy) = (f64::from(rgb.width) / f64::from(rw), f64::from(rgb.height) / f64::from(rh));
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(f64::from(left) * sx, f64::from(top) * sy, f64::from(win_w) * sx, f64::from(win_h) * sy);
    if (win_w, win_h) == target {
        let mut dst = Image::from_slice_u8(win_w, win_h, out, PixelType::U8x3).map_err(|e| err(&e))?;
        return RESIZER.with_borrow_mut(|r| r.resize(&src, &mut dst, &options)).map_err(|e| err(&e));
    }
    let mut dst = Image::new(win_w, win_h, PixelType::U8x3);
    RESIZER.with_borrow_mut(|r| r.resize(&src, &mut dst, &options)).map_err(|e| err(&e))?;
    let row = win_w as usize * 3;
    for (y, line) in dst.buffer().chunks_exact(row).enumerate() {
        let start = y * target.0 as usize * 3;
        out[start..start + row].copy_from_slice(line);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn flat_image_stays_flat_and_crop_pads_black() {
        let data = png(40, 20, |_, _| [10, 200, 30]);
        let geo = Geometry { resize: (20, 10), crop: (2, 12) };
        let mut out = vec![1u8; 10 * 10 * 3];
        decode_into(Path::new("flat.png"), &data, geo, (10, 10), DEFAULT_MAX_PIXELS, &mut out).unwrap();
        let px = |x: usize, y: usize| &out[(y * 10 + x) * 3..(y * 10 + x) * 3 + 3];
        assert_eq!(px(0, 0), [10, 200, 30]);
        assert_eq!(px(7, 7), [10, 200, 30]);
        assert_eq!(px(8, 0), [0, 0, 0]); // right of the resized image (left 12 + 8 = 20)
        assert_eq!(px(0, 8), [0, 0, 0]); // below it (top 2 + 8 = 10)
    }

    #[test]
    fn batch_keeps_order_and_reports_failures() {
        let a = png(8, 8, |_, _| [1, 2, 3]);
        let b = png(8, 8, |_, _| [7, 8, 9]);
        let names = [Path::new("a.png"), Path::new("bad.png"), Path::new("b.png")];
        let bad = b"nope".to_vec();
        let sources = [Source::Bytes(names[0], &a), Source::Bytes(names[1], &bad), Source::Bytes(names[2], &b)];
        let geo = [Geometry { resize: (8, 8), crop: (0, 0) }; 3];
        let batch = decode_batch(&sources, &geo, (4, 4), DEFAULT_MAX_PIXELS);
        assert_eq!(batch.ok, vec![0, 2]);
        assert_eq!(batch.pixels.len(), 2 * 4 * 4 * 3);
        assert_eq!(&batch.pixels[..3], [1, 2, 3]);
        assert_eq!(&batch.pixels[48..51], [7, 8, 9]);
        assert_eq!(batch.errors.len(), 1);
        assert!(batch.errors[0].1.to_string().contains("`bad.png`"));
    }

    #[test]
    fn pixel_limit_refuses_before_decoding() {
        let data = png(100, 100, |_, _| [0, 0, 0]);
        let err = decode_into(Path::new("big.png"), &data, Geometry { resize: (4, 4), crop: (0, 0) }, (4, 4), 9_999, &mut [0; 48]);
        assert!(matches!(err, Err(CacheError::TooManyPixels { width: 100, height: 100, .. })));
    }

    #[derive(Debug, Clone)]
    enum ReaderOp {
        Byte,
        Exact(usize),
        Bytes(usize),
        Peek(usize),
        PeekExact(usize),
        Seek(ZSeekFrom),
        Eof,
        Remaining,
    }

    fn reader_op() -> impl proptest::strategy::Strategy<Value = ReaderOp> {
        use proptest::prelude::*;
        prop_oneof![
            Just(ReaderOp::Byte),
            (0usize..12).prop_map(ReaderOp::Exact),
            (0usize..12).prop_map(ReaderOp::Bytes),
            (0usize..12).prop_map(ReaderOp::Peek),
            (0usize..12).prop_map(ReaderOp::PeekExact),
            (0u64..40).prop_map(|n| ReaderOp::Seek(ZSeekFrom::Start(n))),
            (-40i64..40).prop_map(|n| ReaderOp::Seek(ZSeekFrom::Current(n))),
            (-40i64..10).prop_map(|n| ReaderOp::Seek(ZSeekFrom::End(n))),
            Just(ReaderOp::Eof),
            Just(ReaderOp::Remaining),
        ]
    }

    /// What one reader answers to `op`, and where it stands afterwards.
    fn apply(reader: &mut impl zune_core::bytestream::ZByteReaderTrait, op: &ReaderOp) -> (String, Option<u64>) {
        let mut buf = [0u8; 12];
        let answer = match *op {
            ReaderOp::Byte => format!("{}", reader.read_byte_no_error()),
            ReaderOp::Exact(n) => format!("{:?}", reader.read_exact_bytes(&mut buf[..n]).map(|()| buf[..n].to_vec()).is_ok()),
            ReaderOp::Bytes(n) => format!("{:?}", reader.read_bytes(&mut buf[..n]).ok().map(|k| buf[..k].to_vec())),
            ReaderOp::Peek(n) => format!("{:?}", reader.peek_bytes(&mut buf[..n]).ok().map(|k| buf[..k].to_vec())),
            ReaderOp::PeekExact(n) => format!("{:?}", reader.peek_exact_bytes(&mut buf[..n]).ok().map(|()| buf[..n].to_vec())),
            ReaderOp::Seek(from) => format!("{:?}", reader.z_seek(from).ok()),
            ReaderOp::Eof => format!("{:?}", reader.is_eof().ok()),
            ReaderOp::Remaining => {
                let mut sink = Vec::new();
                format!("{:?}", reader.read_remaining(&mut sink).ok().map(|k| (k, sink)))
            }
        };
        (answer, reader.z_position().ok())
    }

    proptest::proptest! {
        /// The slice reader answers every call exactly as zune-core's own cursor does (the reference path).
        #[test]
        fn slice_reader_behaves_like_zune_cursor(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
            ops in proptest::collection::vec(reader_op(), 0..40),
        ) {
            let mut ours = SliceReader::new(&data);
            let mut reference = zune_core::bytestream::ZCursor::new(&data[..]);
            for op in &ops {
                proptest::prop_assert_eq!(apply(&mut ours, op), apply(&mut reference, op), "after {:?}", op);
            }
        }
    }

    #[test]
    fn orientation_six_rotates_clockwise() {
        // 2x1 image [A B] with orientation 6 displays as a 1x2 column [A; B].
        let img = Rgb { width: 2, height: 1, data: vec![1, 1, 1, 2, 2, 2] };
        let out = orient(img, 6);
        assert_eq!((out.width, out.height, out.data), (1, 2, vec![1, 1, 1, 2, 2, 2]));
        let img = Rgb { width: 2, height: 1, data: vec![1, 1, 1, 2, 2, 2] };
        let out = orient(img, 8);
        assert_eq!((out.width, out.height, out.data), (1, 2, vec![2, 2, 2, 1, 1, 1]));
    }
}
