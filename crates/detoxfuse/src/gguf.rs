//! Opening GGUF files safely: existence, header, metadata and tensor bounds are checked up front
//! so that a truncated download or random bytes yield [`Error::BadGguf`] instead of a panic or
//! a failure halfway through loading.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, IoContext, Result};

/// An opened, validated GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        let bad = |reason: String| Error::BadGguf {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let file_len = file
            .metadata()
            .ctx(|| format!("reading {}", path.display()))?
            .len();
        if file_len < 24 {
            return Err(bad(format!("only {file_len} bytes long")));
        }
        let mut reader = BufReader::new(file);
        check_alignment(&mut reader, file_len).map_err(bad)?;
        reader
            .seek(SeekFrom::Start(0))
            .ctx(|| format!("reading {}", path.display()))?;
        let content = Content::read(&mut reader).map_err(|e| bad(format!("bad header: {e}")))?;
        for (name, info) in &content.tensor_infos {
            // Declared sizes are untrusted: every product and sum is checked, and a tensor
            // must lie inside the file before anything is allocated for it.
            let dims = info.shape.dims();
            let elems = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor {name} has absurd dimensions {dims:?}")))?;
            let bs = info.ggml_dtype.block_size();
            if elems % bs != 0 {
                return Err(bad(format!(
                    "tensor {name} has {elems} elements, not a multiple of its block size {bs}"
                )));
            }
            let end = (elems / bs)
                .checked_mul(info.ggml_dtype.type_size())
                .and_then(|b| (b as u64).checked_add(info.offset))
                .and_then(|b| b.checked_add(content.tensor_data_offset));
            match end {
                Some(end) if end <= file_len => {}
                Some(end) => {
                    return Err(bad(format!(
                    "truncated: tensor {name} ends at byte {end} but the file has {file_len} bytes"
                )))
                }
                None => {
                    return Err(bad(format!(
                        "tensor {name} has an absurd offset or size (beyond 2^64 bytes)"
                    )))
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::Metadata {
                path: self.path.clone(),
                key: key.into(),
                problem: "is missing".into(),
            })
    }

    fn wrong(&self, key: &str, e: impl std::fmt::Display) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.into(),
            problem: format!("has the wrong type: {e}"),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .map_err(|e| self.wrong(key, e))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        self.get(key)?.to_f32().map_err(|e| self.wrong(key, e))
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        self.get(key)?.to_bool().map_err(|e| self.wrong(key, e))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        Ok(self
            .get(key)?
            .to_string()
            .map_err(|e| self.wrong(key, e))?
            .clone())
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key)?.to_vec().map_err(|e| self.wrong(key, e))?;
        v.iter()
            .map(|x| x.to_string().cloned().map_err(|e| self.wrong(key, e)))
            .collect()
    }

    pub fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.get(key)?.to_vec().map_err(|e| self.wrong(key, e))?;
        v.iter()
            .map(|x| x.to_f32().map_err(|e| self.wrong(key, e)))
            .collect()
    }

    pub fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        let v = self.get(key)?.to_vec().map_err(|e| self.wrong(key, e))?;
        v.iter()
            .map(|x| {
                x.to_i32()
                    .or_else(|_| x.to_u32().map(|u| u as i32))
                    .map_err(|e| self.wrong(key, e))
            })
            .collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The LM head: `output.weight`, or the token embeddings when the head is tied to them.
    pub fn lm_head_tensor(&mut self) -> Result<QTensor> {
        if self.has_tensor("output.weight") {
            self.tensor("output.weight")
        } else {
            self.tensor("token_embd.weight")
        }
    }

    /// Reads a tensor as stored.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(Error::BadGguf {
                path: self.path.clone(),
                reason: format!("tensor `{name}` is missing"),
            });
        }
        let path = self.path.clone();
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::BadGguf {
                path,
                reason: format!("cannot read tensor `{name}`: {e}"),
            })
    }
}

/// Converts block formats whose CPU dot product is a scalar loop in candle (Q4_1, Q5_0, Q5_1)
/// to Q8_0, which has SIMD kernels. Q8_0 holds every value of a 4/5-bit block to within 0.4 %
/// of the block's range.
pub fn requantize_for_speed(t: QTensor) -> candle_core::Result<QTensor> {
    use GgmlDType::*;
    if std::env::var("DETOXFUSE_NO_REQUANT").is_ok() {
        return Ok(t);
    }
    match t.dtype() {
        Q8_0 | Q4_0 | Q4K | Q5K | Q6K | Q8K | Q2K | Q3K | F32 | F16 | BF16 => Ok(t),
        _ if t.shape().dims().last().is_some_and(|d| d % 32 == 0) => {
            let w = t.dequantize(&Device::Cpu)?;
            QTensor::quantize(&w, Q8_0)
        }
        _ => Ok(t),
    }
}

/// Refuses a `general.alignment` that candle would divide by (0) or that GGUF forbids (not a
/// power of two), by walking the metadata before candle reads it: candle 0.11 panics on an
/// alignment of 0. Anything else malformed is left for candle's reader to report; the walk
/// never reads past the file or allocates more than one key. It starts at the file's first
/// byte and skips within the buffer (`seek_relative`, its own position count), so walking a
/// vocabulary of 50,000 strings costs a few reads, not a seek each.
fn check_alignment(r: &mut BufReader<File>, file_len: u64) -> std::result::Result<(), String> {
    let mut w = Walk {
        r,
        pos: 0,
        file_len,
    };
    let (Ok(_magic), Ok(version)) = (w.u32(), w.u32()) else {
        return Ok(());
    };
    let wide = version >= 2; // lengths and counts are u64 from version 2 on
    let Some(_tensors) = w.len(wide) else {
        return Ok(());
    };
    let Some(kvs) = w.len(wide) else {
        return Ok(());
    };
    for _ in 0..kvs {
        let Some(n) = w.len(wide).filter(|&n| n <= w.remaining()) else {
            return Ok(());
        };
        let mut key = vec![0u8; n as usize];
        if w.r.read_exact(&mut key).is_err() {
            return Ok(());
        }
        w.pos += n;
        let Ok(ty) = w.u32() else {
            return Ok(());
        };
        if key == b"general.alignment" {
            let v = match ty {
                0 | 1 => w.bytes::<1>().map(|b| u64::from(b[0])),
                2 | 3 => w.bytes::<2>().map(|b| u64::from(u16::from_le_bytes(b))),
                4 | 5 => w.bytes::<4>().map(|b| u64::from(u32::from_le_bytes(b))),
                _ => return Ok(()), // candle then uses its default of 32
            };
            return match v {
                Ok(a) if a == 0 || !a.is_power_of_two() => Err(format!(
                    "general.alignment is {a}; GGUF needs a power of two (usually 32)"
                )),
                _ => Ok(()),
            };
        }
        if w.skip_value(ty, wide, 0).is_none() {
            return Ok(());
        }
    }
    Ok(())
}

/// A forward walk over a GGUF header, for [`check_alignment`].
struct Walk<'a> {
    r: &'a mut BufReader<File>,
    /// Bytes consumed so far.
    pos: u64,
    file_len: u64,
}

impl Walk<'_> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }
    fn len(&mut self, wide: bool) -> Option<u64> {
        if wide {
            self.bytes::<8>().ok().map(u64::from_le_bytes)
        } else {
            self.u32().ok().map(u64::from)
        }
    }
    fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos)
    }
    fn skip(&mut self, n: u64) -> Option<()> {
        if n > self.remaining() {
            return None;
        }
        self.r.seek_relative(i64::try_from(n).ok()?).ok()?;
        self.pos += n;
        Some(())
    }
    /// Skips one value of GGUF type `ty`; `None` when it is malformed or runs past the file.
    fn skip_value(&mut self, ty: u32, wide: bool, depth: usize) -> Option<()> {
        let size = |t: u32| match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            8 => {
                let n = self.len(wide)?;
                self.skip(n)
            }
            9 if depth < 64 => {
                let elem = self.u32().ok()?;
                let count = self.len(wide)?;
                match size(elem) {
                    Some(s) => self.skip(count.checked_mul(s)?),
                    None => {
                        // strings or arrays: each takes at least 4 bytes
                        if count > self.remaining() / 4 {
                            return None;
                        }
                        (0..count).try_for_each(|_| self.skip_value(elem, wide, depth + 1))
                    }
                }
            }
            t => self.skip(size(t)?),
        }
    }
}
