//! Portable Float Map (PFM), the Middlebury format for float disparity.
//!
//! Header `Pf` (one channel) or `PF` (three), then `width height`, then a scale
//! whose sign gives the byte order (negative: little-endian); pixel rows are
//! stored bottom to top. We write single-channel little-endian; we read both
//! kinds and both byte orders (the first channel of `PF`).

use crate::disparity::DisparityMap;

/// Why bytes are not a readable PFM.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PfmError {
    #[error("not a PFM file (header must start with Pf or PF)")]
    NotPfm,
    #[error("malformed PFM header: {0}")]
    BadHeader(String),
    #[error("PFM data is {got} bytes, {expected} expected for the declared size")]
    Truncated { got: usize, expected: usize },
}

/// Single-channel little-endian PFM of `map`.
pub fn encode(map: &DisparityMap) -> Vec<u8> {
    encode_values(map.width(), map.height(), map.values())
}

/// Single-channel little-endian PFM of any float image (`values` row-major,
/// top row first; depth maps use this too).
pub fn encode_values(width: u32, height: u32, values: &[f32]) -> Vec<u8> {
    let header = format!("Pf\n{width} {height}\n-1.0\n");
    let mut out = Vec::with_capacity(header.len() + values.len() * 4);
    out.extend_from_slice(header.as_bytes());
    let width = width as usize;
    if width > 0 {
        for row in values.chunks_exact(width).rev() {
            for v in row {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

/// Reads a PFM into a top-row-first map.
pub fn decode(bytes: &[u8]) -> Result<DisparityMap, PfmError> {
    // Header: three whitespace-separated tokens after the magic, then exactly one whitespace byte.
    let mut pos = 0;
    let mut token = || -> Result<&[u8], PfmError> {
        while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        let start = pos;
        while pos < bytes.len() && !bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        if start == pos {
            return Err(PfmError::BadHeader("header ends early".into()));
        }
        Ok(&bytes[start..pos])
    };
    let channels = match token().map_err(|_| PfmError::NotPfm)? {
        b"Pf" => 1usize,
        b"PF" => 3,
        _ => return Err(PfmError::NotPfm),
    };
    let number = |t: &[u8]| std::str::from_utf8(t).ok().map(str::to_owned).unwrap_or_default();
    let width: u32 = number(token()?).parse().map_err(|_| PfmError::BadHeader("bad width".into()))?;
    let height: u32 = number(token()?).parse().map_err(|_| PfmError::BadHeader("bad height".into()))?;
    let scale: f32 = number(token()?).parse().map_err(|_| PfmError::BadHeader("bad scale".into()))?;
    if scale == 0.0 || !scale.is_finite() {
        return Err(PfmError::BadHeader("scale must be a non-zero number".into()));
    }
    let data = bytes.get(pos + 1..).unwrap_or_default();
    let pixels = width as usize * height as usize;
    let expected = pixels.checked_mul(channels * 4).ok_or_else(|| PfmError::BadHeader("size overflows".into()))?;
    if data.len() < expected {
        return Err(PfmError::Truncated { got: data.len(), expected });
    }
    let little = scale < 0.0;
    let mut values = Vec::with_capacity(pixels);
    let row_bytes = width as usize * channels * 4;
    if row_bytes > 0 {
        for row in data[..expected].chunks_exact(row_bytes).rev() {
            for px in row.chunks_exact(channels * 4) {
                let b = [px[0], px[1], px[2], px[3]];
                values.push(if little { f32::from_le_bytes(b) } else { f32::from_be_bytes(b) });
            }
        }
    }
    Ok(DisparityMap::new(width, height, values).expect("one value per pixel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_header_and_rows_bottom_to_top() {
        let map = DisparityMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let bytes = encode(&map);
        let header = b"Pf\n2 2\n-1.0\n";
        assert_eq!(&bytes[..header.len()], header);
        let floats: Vec<f32> =
            bytes[header.len()..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(floats, vec![3.0, 4.0, 1.0, 2.0]);
    }

    #[test]
    fn round_trips_including_infinity() {
        let map = DisparityMap::new(3, 2, vec![0.0, 1.5, f32::INFINITY, 191.25, -0.5, 7.0]).unwrap();
        assert_eq!(decode(&encode(&map)).unwrap(), map);
    }

    #[test]
    fn reads_big_endian_three_channel_files() {
        let mut bytes = b"PF\n1 2\n1.0\n".to_vec();
        for v in [5.0f32, 0.0, 0.0, 9.0, 0.0, 0.0] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        let map = decode(&bytes).unwrap();
        // Bottom row (5.0) is stored first.
        assert_eq!(map.values(), &[9.0, 5.0]);
    }

    #[test]
    fn refuses_malformed_files() {
        assert_eq!(decode(b"P6\n1 1\n255\n..."), Err(PfmError::NotPfm));
        assert_eq!(decode(b""), Err(PfmError::NotPfm));
        assert!(matches!(decode(b"Pf\nx 1\n-1\n"), Err(PfmError::BadHeader(_))));
        assert!(matches!(decode(b"Pf\n1 1\n0\n0000"), Err(PfmError::BadHeader(_))));
        assert_eq!(decode(b"Pf\n2 1\n-1\n\0\0\0\0"), Err(PfmError::Truncated { got: 4, expected: 8 }));
    }
}
