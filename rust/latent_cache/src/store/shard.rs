//! Shard files: safetensors headers (parsed and written with the `safetensors` crate), streaming CRC-32.
use super::Dtype;
use crate::error::{CacheError, Result};
use safetensors::tensor::{TensorInfo, View};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use super::index::Stamp;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest header accepted (the `safetensors` crate's own limit): a hostile length never allocates more.
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Read size of the streaming checksum: memory per checking thread, whatever the shard size.
pub(crate) const CRC_CHUNK: usize = 1 << 20;

/// One tensor of a shard, offsets absolute in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpan {
    /// Tensor name (cache key).
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// First byte in the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

fn to_crate(dtype: Dtype) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match dtype {
        Dtype::Bool => S::BOOL,
        Dtype::U8 => S::U8,
        Dtype::I8 => S::I8,
        Dtype::I16 => S::I16,
        Dtype::I32 => S::I32,
        Dtype::I64 => S::I64,
        Dtype::F16 => S::F16,
        Dtype::BF16 => S::BF16,
        Dtype::F32 => S::F32,
        Dtype::F64 => S::F64,
    }
}

fn from_crate(dtype: safetensors::Dtype) -> Option<Dtype> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::BOOL => Dtype::Bool,
        S::U8 => Dtype::U8,
        S::I8 => Dtype::I8,
        S::I16 => Dtype::I16,
        S::I32 => Dtype::I32,
        S::I64 => Dtype::I64,
        S::F16 => Dtype::F16,
        S::BF16 => Dtype::BF16,
        S::F32 => Dtype::F32,
        S::F64 => Dtype::F64,
        _ => return None,
    })
}

/// A pending tensor as the `safetensors` serializer sees it.
pub(crate) struct Pending {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl View for &Pending {
    fn dtype(&self) -> safetensors::Dtype {
        to_crate(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The bytes of a shard file holding `tensors`, with the format name and version as safetensors metadata.
pub(crate) fn serialize(path: &Path, tensors: &[Pending]) -> Result<Vec<u8>> {
    let meta = HashMap::from([
        ("format".to_string(), super::FORMAT_NAME.to_string()),
        ("format_version".to_string(), super::FORMAT_VERSION.to_string()),
    ]);
    safetensors::serialize(tensors.iter().map(|t| (t.key.as_str(), t)), Some(meta))
        .map_err(|e| CacheError::format(path, format!("cannot serialize shard: {e}")))
}

/// Length of the JSON header from the first 8 bytes, bounded by the file size and the crate's limit.
pub(crate) fn header_len(first8: &[u8], file_len: u64) -> std::result::Result<usize, String> {
    let n = u64::from_le_bytes(first8.try_into().map_err(|_| "shorter than its 8-byte header length".to_string())?);
    if n > MAX_HEADER_BYTES || n.checked_add(8).map_or(true, |end| end > file_len) {
        return Err(format!("header length {n} does not fit in a file of {file_len} bytes"));
    }
    usize::try_from(n).map_err(|_| format!("header length {n} is too large"))
}

/// A shard header's tensors in the order the JSON lists them; `__metadata__` (format name and version, which the
/// index already vouches for) is skipped. A map visitor instead of the crate's `Metadata`: that hashes every key
/// three times with SipHash and clones it once more, a second per million entries at every reader start.
struct HeaderTensors(Vec<(String, TensorInfo)>);

impl<'de> Deserialize<'de> for HeaderTensors {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Tensors;
        impl<'de> Visitor<'de> for Tensors {
            type Value = HeaderTensors;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a safetensors header (a JSON object of tensors)")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> std::result::Result<HeaderTensors, M::Error> {
                let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        tensors.push((key, map.next_value::<TensorInfo>()?));
                    }
                }
                Ok(HeaderTensors(tensors))
            }
        }
        deserializer.deserialize_map(Tensors)
    }
}

/// Byte length of a tensor of `info`'s dtype and shape; None on overflow or a size that is not whole bytes.
fn byte_len(info: &TensorInfo) -> Option<usize> {
    let elements = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    let bits = elements.checked_mul(info.dtype.bitsize())?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// Parses a shard's JSON header by the safetensors format's rules (the `safetensors` crate's `TensorInfo` and
/// dtypes; tensors packed from offset 0 in offset order, no gap, no overlap, each exactly its shape's bytes, no
/// overflow) and checks that the data ends exactly at `file_len` and that the tensors are exactly `keys`.
pub(crate) fn parse_header(json: &[u8], file_len: u64, keys: &[String]) -> std::result::Result<Vec<TensorSpan>, String> {
    let HeaderTensors(mut tensors) = serde_json::from_slice(json).map_err(|e| format!("unreadable safetensors header: {e}"))?;
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let data_start = 8usize.checked_add(json.len()).ok_or("header too large")?;
    let mut end = 0usize;
    let mut spans = Vec::with_capacity(tensors.len());
    for (key, info) in tensors {
        let (s, e) = info.data_offsets;
        if s != end || e < s {
            return Err(format!("tensor `{key}` has data_offsets [{s}, {e}]; the previous tensor ends at {end}"));
        }
        let len = byte_len(&info).ok_or_else(|| format!("tensor `{key}`: its shape's size overflows"))?;
        if e - s != len {
            return Err(format!("tensor `{key}` spans {} bytes, its dtype and shape need {len}", e - s));
        }
        let dtype = from_crate(info.dtype).ok_or_else(|| format!("tensor `{key}` has dtype {:?}, which this cache never writes", info.dtype))?;
        let offset = data_start.checked_add(s).ok_or("tensor offsets overflow")?;
        spans.push(TensorSpan { key, dtype, shape: info.shape, offset, len });
        end = e;
    }
    let data_end = data_start.checked_add(end).ok_or("tensor offsets overflow")?;
    if data_end as u64 != file_len {
        return Err(format!("header describes {data_end} bytes, the file has {file_len}"));
    }
    let mut in_header: Vec<&str> = spans.iter().map(|s| s.key.as_str()).collect();
    let mut in_index: Vec<&str> = keys.iter().map(String::as_str).collect();
    in_header.sort_unstable();
    in_index.sort_unstable();
    if in_header != in_index {
        let (header, index): (HashSet<&str>, HashSet<&str>) = (in_header.iter().copied().collect(), in_index.iter().copied().collect());
        let extra = header.difference(&index).count();
        let missing = index.difference(&header).count();
        let repeated = spans.len() - header.len() + keys.len() - index.len();
        return Err(format!(
            "header and index disagree on keys ({missing} listed only in the index, {extra} only in the header, {repeated} repeated)"
        ));
    }
    Ok(spans)
}

/// Opens a shard for reading, refusing a symbolic link or anything but a regular file.
pub(crate) fn open_shard(path: &Path) -> std::result::Result<(File, Stamp), ShardFault> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(ShardFault::io)?;
    let meta = file.metadata().map_err(ShardFault::io)?;
    if !meta.is_file() {
        return Err(ShardFault::Foreign("is not a regular file".into()));
    }
    Ok((file, Stamp::of(&meta)))
}

/// Reads the header of an open shard (two small reads, never the tensor data).
pub(crate) fn read_header(file: &File, file_len: u64, keys: &[String]) -> std::result::Result<Vec<TensorSpan>, ShardFault> {
    let mut first8 = [0u8; 8];
    if file_len < 8 {
        return Err(ShardFault::Corrupt(format!("{file_len} bytes, shorter than a safetensors header")));
    }
    file.read_exact_at(&mut first8, 0).map_err(ShardFault::io)?;
    let n = header_len(&first8, file_len).map_err(ShardFault::Corrupt)?;
    let mut json = vec![0u8; n];
    file.read_exact_at(&mut json, 8).map_err(ShardFault::io)?;
    parse_header(&json, file_len, keys).map_err(ShardFault::Corrupt)
}

/// CRC-32 of `len` bytes of `file`, read in chunks of [`CRC_CHUNK`] into one buffer.
pub(crate) fn streaming_crc(file: &File, len: u64) -> std::result::Result<u32, ShardFault> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CRC_CHUNK.min(usize::try_from(len).unwrap_or(CRC_CHUNK))];
    let mut pos = 0u64;
    while pos < len {
        let want = usize::try_from(len - pos).map_or(buf.len(), |left| left.min(buf.len()));
        file.read_exact_at(&mut buf[..want], pos).map_err(ShardFault::io)?;
        hasher.update(&buf[..want]);
        pos += want as u64;
    }
    Ok(hasher.finalize())
}

/// Why a shard cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardFault {
    /// Proven bad: missing, wrong size, CRC or header. A repair deletes it.
    Corrupt(String),
    /// The check itself failed (permission denied, I/O error, stale NFS handle, changed while read): kept.
    Unreadable(String),
    /// Not a file this cache writes (bad name, symbolic link, not a regular file): never touched.
    Foreign(String),
}

impl ShardFault {
    /// Classifies an I/O error: only a missing file is proof; anything else may pass.
    pub(crate) fn io(e: io::Error) -> ShardFault {
        match e.kind() {
            io::ErrorKind::NotFound => ShardFault::Corrupt("missing".into()),
            io::ErrorKind::UnexpectedEof => ShardFault::Unreadable("the file shrank while it was read".into()),
            _ if e.raw_os_error() == Some(libc::ELOOP) => ShardFault::Foreign("is a symbolic link; shards are never links".into()),
            _ => ShardFault::Unreadable(format!("cannot read: {e}")),
        }
    }

    /// The reason in words.
    pub fn reason(&self) -> &str {
        match self {
            ShardFault::Corrupt(r) | ShardFault::Unreadable(r) | ShardFault::Foreign(r) => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_other_than_missing_are_never_proof() {
        assert!(matches!(ShardFault::io(io::Error::from(io::ErrorKind::NotFound)), ShardFault::Corrupt(_)));
        for errno in [libc::EIO, libc::EACCES, libc::EPERM, libc::ESTALE, libc::ENOMEM, libc::EINTR] {
            assert!(matches!(ShardFault::io(io::Error::from_raw_os_error(errno)), ShardFault::Unreadable(_)), "{errno}");
        }
        assert!(matches!(ShardFault::io(io::Error::from_raw_os_error(libc::ELOOP)), ShardFault::Foreign(_)));
    }

    #[test]
    fn header_length_is_bounded_by_the_file() {
        assert!(header_len(&u64::MAX.to_le_bytes(), 100).is_err());
        assert!(header_len(&(u64::MAX - 4).to_le_bytes(), u64::MAX).is_err());
        assert!(header_len(&93u64.to_le_bytes(), 100).is_err());
        assert_eq!(header_len(&92u64.to_le_bytes(), 100), Ok(92));
        assert!(header_len(&[1, 2, 3], 100).is_err());
    }

    #[test]
    fn offsets_that_overflow_are_refused_without_panic() {
        let json = format!(r#"{{"a":{{"dtype":"F32","shape":[{},4],"data_offsets":[0,16]}}}}"#, usize::MAX);
        assert!(parse_header(json.as_bytes(), 8 + json.len() as u64 + 16, &["a".into()]).is_err());
        let json = format!(r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[{},{}]}}}}"#, usize::MAX, usize::MAX);
        assert!(parse_header(json.as_bytes(), u64::MAX, &["a".into()]).is_err());
    }

    /// Our parse against the `safetensors` crate's own reading of the same file: both accept it with the same
    /// tensors, or both refuse it.
    fn agrees_with_the_crate(json: &str, data_len: usize) {
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json.as_bytes());
        file.resize(file.len() + data_len, 0);
        let keys: Vec<String> = match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
            Ok(map) => map.keys().filter(|k| *k != "__metadata__").cloned().collect(),
            Err(_) => vec![],
        };
        let ours = parse_header(json.as_bytes(), file.len() as u64, &keys);
        match safetensors::SafeTensors::deserialize(&file) {
            Ok(theirs) => {
                let mut ours = ours.unwrap_or_else(|e| panic!("{json}: the crate reads it, we refuse: {e}"));
                ours.sort_by(|a, b| a.key.cmp(&b.key));
                let mut expected: Vec<(String, Vec<usize>, usize)> = theirs
                    .tensors()
                    .into_iter()
                    .map(|(k, v)| (k, v.shape().to_vec(), v.data().as_ptr() as usize - file.as_ptr() as usize))
                    .collect();
                expected.sort();
                let got: Vec<(String, Vec<usize>, usize)> = ours.into_iter().map(|s| (s.key, s.shape, s.offset)).collect();
                assert_eq!(got, expected, "{json}");
            }
            Err(e) => assert!(ours.is_err(), "{json}: the crate refuses it ({e:?}), we read it"),
        }
    }

    #[test]
    fn headers_are_read_as_the_safetensors_crate_reads_them() {
        let cases = [
            // packed, listed out of offset order, with metadata
            (r#"{"__metadata__":{"format":"x"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#, 16),
            (r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#, 3),
            // a gap, an overlap, a size its shape does not need, offsets backwards, data left over
            (r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#, 5),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#, 4),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4),
            (r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#, 4),
            (r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#, 3),
            // the same key twice, not JSON, not an object, an unknown dtype
            (r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#, 4),
            (r#"{"a":"#, 0),
            (r#"[1,2]"#, 0),
            (r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,2]}}"#, 2),
        ];
        for (json, data_len) in cases {
            agrees_with_the_crate(json, data_len);
        }
    }

    #[test]
    fn keys_must_match_the_index_exactly() {
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let len = 8 + json.len() as u64 + 2;
        assert!(parse_header(json.as_bytes(), len, &["b".into(), "a".into()]).is_ok());
        for keys in [vec!["a"], vec!["a", "c"], vec!["a", "b", "c"], vec!["a", "a"]] {
            let keys: Vec<String> = keys.into_iter().map(String::from).collect();
            let error = parse_header(json.as_bytes(), len, &keys).unwrap_err();
            assert!(error.contains("disagree on keys"), "{keys:?}: {error}");
        }
    }
}
