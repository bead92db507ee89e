//! Our PNG writer: the image cut into strips of rows that are filtered and
//! compressed side by side, one task a strip on the CPU pool, each strip's
//! DEFLATE written by a maintained encoder (zlib-rs).
//!
//! A PNG holds one zlib stream, which a single compressor writes in order; at
//! KITTI size that was most of a `png16` or `color` answer's encoding. DEFLATE
//! lets a stream be cut into blocks, and a block may start anywhere once the
//! previous one ends on a byte boundary, which is what a sync flush does (an
//! empty stored block after the strip's last block, as pigz joins its pieces).
//! So each strip is compressed on its own (raw DEFLATE, ending in a sync flush
//! but the last, which finishes the stream), the strips' bytes are
//! concatenated behind one zlib header, and their Adler-32s are combined into
//! the stream's. What is ours: the strip split, the Up filter, feeding each
//! strip to its encoder a cache-sized chunk of rows at a time, and the chunks
//! of the file; the DEFLATE coding and the checksums are zlib-rs's. The decoded
//! pixels are exactly the input (tested against the image crate's decoder and
//! miniz_oxide's inflate; browsers and Python's zlib read them in the
//! end-to-end tests).
//!
//! Every row uses PNG's "Up" filter (the difference to the row above), so areas
//! like the row above become runs of zeros, which the encoder's matches take.
//! Which encoder and at which setting: `deflate_config`, chosen with
//! `make bench-request`, which compares zlib-rs's levels and strategies and
//! miniz_oxide per strip on the same maps (docs/performance.md).

/// What one pixel is in the PNG we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelKind {
    /// One 8-bit sample.
    Gray8,
    /// One 16-bit sample, big-endian (as PNG stores it).
    Gray16,
    /// Three 8-bit samples.
    Rgb8,
    /// One byte indexing a palette of RGB triples.
    Indexed,
}

impl PixelKind {
    fn bytes_per_pixel(self) -> usize {
        match self {
            PixelKind::Gray8 | PixelKind::Indexed => 1,
            PixelKind::Gray16 => 2,
            PixelKind::Rgb8 => 3,
        }
    }

    /// (bit depth, colour type) of the IHDR chunk.
    fn header_codes(self) -> (u8, u8) {
        match self {
            PixelKind::Gray8 => (8, 0),
            PixelKind::Gray16 => (16, 0),
            PixelKind::Rgb8 => (8, 2),
            PixelKind::Indexed => (8, 3),
        }
    }
}

/// Bytes of raw pixels below which an image is one strip: starting a thread
/// costs tens of microseconds, compressing 64 KiB a few hundred.
const MIN_STRIP_BYTES: usize = 64 * 1024;

/// PNG of `raw` (rows of `width` pixels of `kind`, top to bottom, no padding),
/// in as many strips as this machine has cores, within [`MIN_STRIP_BYTES`].
/// `palette` (RGB triples) is required for [`PixelKind::Indexed`] only.
pub fn encode(raw: &[u8], width: u32, height: u32, kind: PixelKind, palette: Option<&[u8]>) -> Vec<u8> {
    encode_in_strips(raw, width, height, kind, palette, strips_for(width, height, kind))
}

/// PNG of the rows `fill_row(y, row)` writes (row `y`'s raw pixels of
/// `kind`; it must write every byte, the row may hold an earlier one), called
/// on the strips' threads: turning values into pixels (colours, 16-bit
/// samples) then runs side by side too, and no whole raw image is made.
/// A strip also asks for the row above its first, for the Up filter.
pub fn encode_rows<F>(width: u32, height: u32, kind: PixelKind, palette: Option<&[u8]>, fill_row: F) -> Vec<u8>
where
    F: Fn(usize, &mut [u8]) + Sync,
{
    encode_rows_in_strips(width, height, kind, palette, strips_for(width, height, kind), fill_row)
}

/// One strip a core, each of at least [`MIN_STRIP_BYTES`] of raw pixels.
fn strips_for(width: u32, height: u32, kind: PixelKind) -> usize {
    // The CPU pool's size (rayon's global pool: see `pipeline::pool`).
    let cores = rayon::current_num_threads();
    let raw_bytes = width as usize * kind.bytes_per_pixel() * height as usize;
    cores.min(raw_bytes / MIN_STRIP_BYTES).max(1)
}

/// [`encode`] with the number of strips chosen by the caller (tests use it
/// to cover strip boundaries on any machine).
pub fn encode_in_strips(
    raw: &[u8],
    width: u32,
    height: u32,
    kind: PixelKind,
    palette: Option<&[u8]>,
    strips: usize,
) -> Vec<u8> {
    let stride = width as usize * kind.bytes_per_pixel();
    assert_eq!(raw.len(), stride * height as usize, "raw pixels must be width x height x bytes per pixel");
    encode_rows_in_strips(width, height, kind, palette, strips, |y, row| {
        row.copy_from_slice(&raw[y * stride..(y + 1) * stride])
    })
}

fn encode_rows_in_strips<F>(
    width: u32,
    height: u32,
    kind: PixelKind,
    palette: Option<&[u8]>,
    strips: usize,
    fill_row: F,
) -> Vec<u8>
where
    F: Fn(usize, &mut [u8]) + Sync,
{
    assert!(width > 0 && height > 0, "a PNG has at least one pixel");
    assert_eq!(kind == PixelKind::Indexed, palette.is_some(), "a palette goes with indexed pixels only");
    let bpp = kind.bytes_per_pixel();
    let stride = width as usize * bpp;
    let rows = height as usize;
    let strips = strips.clamp(1, rows);
    let rows_per_strip = rows.div_ceil(strips);
    let ranges: Vec<(usize, usize)> =
        (0..rows).step_by(rows_per_strip).map(|start| (start, (start + rows_per_strip).min(rows))).collect();
    let last = ranges.len() - 1;
    let compress = |k: usize| compress_strip(&fill_row, kind, stride, ranges[k], k == last);
    let parts: Vec<CompressedStrip> = if ranges.len() == 1 {
        vec![compress(0)]
    } else {
        use rayon::prelude::*;
        (0..ranges.len()).into_par_iter().map(compress).collect()
    };
    assemble(width, height, kind, palette, &parts)
}

/// One strip's share of the zlib stream: its DEFLATE blocks, ending on a
/// byte boundary, and the Adler-32 of its filtered bytes.
struct CompressedStrip {
    deflate: Vec<u8>,
    adler: u32,
    filtered_len: usize,
}

/// Filtered bytes handed to the encoder at a time: small enough to stay in
/// the core's cache between filtering and compressing, large enough that a
/// call's overhead does not count.
const CHUNK_BYTES: usize = 64 * 1024;

/// Rows `start..end`: each made by `fill_row` and Up-filtered into a chunk,
/// which is checksummed and compressed before the next chunk is made.
fn compress_strip<F>(
    fill_row: &F,
    kind: PixelKind,
    stride: usize,
    (start, end): (usize, usize),
    last: bool,
) -> CompressedStrip
where
    F: Fn(usize, &mut [u8]),
{
    // The row above (zeros above the image) and this row, raw; then filtered.
    let mut above = vec![0u8; stride];
    let mut current = vec![0u8; stride];
    if start > 0 {
        fill_row(start - 1, &mut above);
    }
    let rows_per_chunk = (CHUNK_BYTES / (stride + 1)).max(1);
    let mut chunk = vec![0u8; rows_per_chunk.min(end - start) * (stride + 1)];
    let mut encoder = StripEncoder::new(kind, (end - start) * (stride + 1));
    let mut adler = 1;
    for first in (start..end).step_by(rows_per_chunk) {
        let rows = first..(first + rows_per_chunk).min(end);
        let filtered = &mut chunk[..rows.len() * (stride + 1)];
        for (y, out) in rows.zip(filtered.chunks_exact_mut(stride + 1)) {
            fill_row(y, &mut current);
            filter_up(&current, &above, out);
            std::mem::swap(&mut above, &mut current);
        }
        adler = zlib_rs::adler32::adler32(adler, filtered);
        encoder.push(filtered, zlib_rs::DeflateFlush::NoFlush);
    }
    let end_of_strip = if last { zlib_rs::DeflateFlush::Finish } else { zlib_rs::DeflateFlush::SyncFlush };
    encoder.push(&[], end_of_strip);
    CompressedStrip { deflate: encoder.finish(), adler, filtered_len: (end - start) * (stride + 1) }
}

/// zlib-rs's setting for the strips of each pixel kind, chosen with
/// `make bench-request` on KITTI-sized maps (docs/performance.md): the fastest
/// setting whose files stay within a fifth of the size our own DEFLATE coding
/// wrote before. Level 2 ("fast": hash-chain matches, dynamic Huffman codes)
/// for colours, palette indices and 8-bit samples: level 1 ("quick": fixed
/// codes) is faster there but writes 80 % more bytes. Level 1 for 16-bit
/// samples: 13 % more bytes, where level 2 takes 1.7 times as long. Raw
/// DEFLATE (negative window bits): the zlib header and trailer are ours.
fn deflate_config(kind: PixelKind) -> zlib_rs::DeflateConfig {
    let level = if kind == PixelKind::Gray16 { 1 } else { 2 };
    zlib_rs::DeflateConfig { level, window_bits: -15, ..Default::default() }
}

/// One strip's encoder and the DEFLATE bytes it has written so far.
struct StripEncoder {
    deflate: zlib_rs::Deflate,
    /// Zeroed ahead of the encoder; the first `written` bytes are its output.
    out: Vec<u8>,
    written: usize,
}

impl StripEncoder {
    fn new(kind: PixelKind, filtered_len: usize) -> StripEncoder {
        // Filtered maps compress several times; a quarter is rarely outgrown.
        let out = vec![0u8; filtered_len / 4 + 4096];
        StripEncoder { deflate: zlib_rs::Deflate::new_with_config(deflate_config(kind)), out, written: 0 }
    }

    /// Compresses `input`; with a sync flush or finish, until all of the
    /// strip's output is written, growing the buffer as needed.
    fn push(&mut self, input: &[u8], flush: zlib_rs::DeflateFlush) {
        let mut consumed = 0;
        loop {
            if self.out.len() - self.written < 1024 {
                self.out.resize(self.out.len() * 2, 0);
            }
            let before = (self.deflate.total_in(), self.deflate.total_out());
            let room = self.out.len() - self.written;
            let status = self
                .deflate
                .compress(&input[consumed..], &mut self.out[self.written..], flush)
                .expect("a valid deflate stream");
            let written = (self.deflate.total_out() - before.1) as usize;
            self.written += written;
            consumed += (self.deflate.total_in() - before.0) as usize;
            // Done when all input is in and the output had room left (zlib's
            // sign that nothing is pending), or when the stream has ended.
            let drained = consumed == input.len() && written < room;
            let finished = status == zlib_rs::Status::StreamEnd;
            if finished || (drained && flush != zlib_rs::DeflateFlush::Finish) {
                break;
            }
        }
    }

    /// The strip's DEFLATE bytes.
    fn finish(mut self) -> Vec<u8> {
        self.out.truncate(self.written);
        self.out
    }
}

/// PNG filter type "Up": each byte minus the byte above it (0 above the first row).
const FILTER_UP: u8 = 2;

/// A row as PNG stores it: the filter byte, then the Up differences.
fn filter_up(row: &[u8], above: &[u8], out: &mut [u8]) {
    out[0] = FILTER_UP;
    for ((o, &b), &a) in out[1..].iter_mut().zip(row).zip(above) {
        *o = b.wrapping_sub(a);
    }
}

/// The file: signature, IHDR, PLTE when indexed, one IDAT holding the zlib
/// stream (header, the strips' blocks, Adler-32), IEND.
fn assemble(width: u32, height: u32, kind: PixelKind, palette: Option<&[u8]>, parts: &[CompressedStrip]) -> Vec<u8> {
    let deflate_len: usize = parts.iter().map(|p| p.deflate.len()).sum();
    let mut out = Vec::with_capacity(deflate_len + 128 + palette.map_or(0, <[u8]>::len));
    out.extend_from_slice(b"\x89PNG\r\n\x1a\n");

    let (depth, colour) = kind.header_codes();
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[depth, colour, 0, 0, 0]);
    write_chunk(&mut out, b"IHDR", &[&header]);
    if let Some(palette) = palette {
        write_chunk(&mut out, b"PLTE", &[palette]);
    }

    let adler = parts
        .iter()
        .skip(1)
        .fold(parts[0].adler, |sum, p| zlib_rs::adler32::adler32_combine(sum, p.adler, p.filtered_len as u64));
    // zlib header: deflate, 32 KiB window, "fastest" level, check bits.
    let mut pieces: Vec<&[u8]> = vec![&[0x78, 0x01]];
    pieces.extend(parts.iter().map(|p| p.deflate.as_slice()));
    let trailer = adler.to_be_bytes();
    pieces.push(&trailer);
    write_chunk(&mut out, b"IDAT", &pieces);
    write_chunk(&mut out, b"IEND", &[]);
    out
}

/// A chunk: length, type, data (given in pieces), CRC-32 of type and data.
fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], pieces: &[&[u8]]) {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&u32::try_from(len).expect("a PNG chunk holds under 2 GiB").to_be_bytes());
    let mut crc = zlib_rs::crc32::crc32(0, kind);
    out.extend_from_slice(kind);
    for piece in pieces {
        crc = zlib_rs::crc32::crc32(crc, piece);
        out.extend_from_slice(piece);
    }
    out.extend_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that look like images: flat areas, gradients, noise.
    fn image_like(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut next = move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        (0..len)
            .map(|i| match (i / 997) % 3 {
                0 => 7,
                1 => (i / 13) as u8,
                _ => next() as u8,
            })
            .collect()
    }

    fn decode_with_png_crate(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let mut reader = decoder.read_info().expect("a valid PNG header");
        let mut pixels = vec![0; reader.output_buffer_size().expect("fits")];
        let info = reader.next_frame(&mut pixels).expect("valid image data");
        pixels.truncate(info.buffer_size());
        (info, pixels)
    }

    /// The zlib stream of the IDAT chunk, inflated by miniz_oxide (a second,
    /// independent decoder, which also checks the Adler-32), unfiltered here.
    fn decode_with_miniz(bytes: &[u8], stride: usize) -> Vec<u8> {
        let idat_at = bytes.windows(4).position(|w| w == b"IDAT").expect("an IDAT chunk");
        let len = u32::from_be_bytes(bytes[idat_at - 4..idat_at].try_into().unwrap()) as usize;
        let stream = &bytes[idat_at + 4..idat_at + 4 + len];
        let filtered = miniz_oxide::inflate::decompress_to_vec_zlib(stream).expect("a valid zlib stream");
        let mut raw: Vec<u8> = Vec::new();
        for (y, row) in filtered.chunks(stride + 1).enumerate() {
            assert_eq!(row[0], FILTER_UP);
            for (x, &d) in row[1..].iter().enumerate() {
                let above = if y == 0 { 0 } else { raw[(y - 1) * stride + x] };
                raw.push(d.wrapping_add(above));
            }
        }
        raw
    }

    #[test]
    fn every_kind_and_strip_count_decodes_to_the_same_pixels() {
        let palette: Vec<u8> = (0..=255u8).flat_map(|i| [i, 255 - i, i / 2]).collect();
        for kind in [PixelKind::Gray8, PixelKind::Gray16, PixelKind::Rgb8, PixelKind::Indexed] {
            for (width, height) in [(1, 1), (1, 9), (9, 1), (37, 23), (300, 41)] {
                let stride = width as usize * kind.bytes_per_pixel();
                let raw = image_like(stride * height as usize, u64::from(width * height));
                let palette = (kind == PixelKind::Indexed).then_some(palette.as_slice());
                for strips in [1, 2, 3, 7, 100] {
                    let png = encode_in_strips(&raw, width, height, kind, palette, strips);
                    let (info, pixels) = decode_with_png_crate(&png);
                    assert_eq!((info.width, info.height), (width, height));
                    assert_eq!(pixels, raw, "{kind:?} {width}x{height} in {strips} strips (png crate)");
                    assert_eq!(decode_with_miniz(&png, stride), raw, "{kind:?} {width}x{height} {strips} (miniz)");
                }
            }
        }
    }

    #[test]
    fn the_image_crate_reads_colour_and_16_bit_images_back() {
        let raw = image_like(64 * 48 * 3, 3);
        let png = encode_in_strips(&raw, 64, 48, PixelKind::Rgb8, None, 4);
        assert_eq!(image::load_from_memory(&png).unwrap().into_rgb8().into_raw(), raw);
        let samples: Vec<u16> = (0..64 * 48).map(|i| (i * 37 % 65_536) as u16).collect();
        let big_endian: Vec<u8> = samples.iter().flat_map(|s| s.to_be_bytes()).collect();
        let png = encode_in_strips(&big_endian, 64, 48, PixelKind::Gray16, None, 3);
        assert_eq!(image::load_from_memory(&png).unwrap().into_luma16().into_raw(), samples);
    }

    #[test]
    fn random_shapes_contents_and_strip_counts_decode() {
        // 300 images of random size, pixel kind, strip count and content:
        // noise, sparse dots, flat bands with random breaks, rare bright pixels.
        let mut state = 12_345u64;
        let mut next = move |modulus: u64| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % modulus
        };
        let grey_palette: Vec<u8> = (0..=255u8).flat_map(|i| [i, i, i]).collect();
        let kinds = [PixelKind::Gray8, PixelKind::Gray16, PixelKind::Rgb8, PixelKind::Indexed];
        for round in 0..300 {
            let kind = kinds[next(4) as usize];
            let (width, height) = (1 + next(700) as u32, 1 + next(90) as u32);
            let stride = width as usize * kind.bytes_per_pixel();
            let content = next(4);
            let raw: Vec<u8> = (0..stride * height as usize)
                .map(|i| match content {
                    0 => next(256) as u8,
                    1 => u8::from(i % 7 == 0),
                    2 => ((i / 300) % 3) as u8 * next(2) as u8,
                    _ => u8::from(next(1000) < 3) * 200,
                })
                .collect();
            let strips = 1 + next(12) as usize;
            let palette = (kind == PixelKind::Indexed).then_some(grey_palette.as_slice());
            let png = encode_in_strips(&raw, width, height, kind, palette, strips);
            let case = format!("round {round}: {kind:?} {width}x{height}, content {content}, {strips} strips");
            assert_eq!(decode_with_png_crate(&png).1, raw, "{case} (png crate)");
            assert_eq!(decode_with_miniz(&png, stride), raw, "{case} (miniz)");
        }
    }

    #[test]
    fn strips_of_several_blocks_decode() {
        // Noise: the encoder's blocks fill before a strip ends, so each strip holds several.
        let (width, height) = (1000u32, 200u32);
        let raw = image_like(width as usize * height as usize * 3, 11)
            .iter()
            .enumerate()
            .map(|(i, &b)| b ^ (i as u8).wrapping_mul(151))
            .collect::<Vec<u8>>();
        assert!(raw.len() / 2 > 2 * 64 * 1024);
        for strips in [1, 2] {
            let png = encode_in_strips(&raw, width, height, PixelKind::Rgb8, None, strips);
            assert_eq!(decode_with_png_crate(&png).1, raw, "{strips} strips");
            assert_eq!(decode_with_miniz(&png, width as usize * 3), raw, "{strips} strips (miniz)");
        }
    }

    #[test]
    fn rows_wider_than_a_chunk_decode() {
        // Each row alone outgrows a chunk, and noise outgrows the first output buffer.
        let (width, height) = (30_000u32, 5u32);
        let raw: Vec<u8> = image_like(width as usize * height as usize * 3, 5)
            .iter()
            .enumerate()
            .map(|(i, &b)| b ^ (i as u8).wrapping_mul(151))
            .collect();
        assert!(raw.len() / height as usize > CHUNK_BYTES);
        for strips in [1, 2, 5] {
            let png = encode_in_strips(&raw, width, height, PixelKind::Rgb8, None, strips);
            assert_eq!(decode_with_png_crate(&png).1, raw, "{strips} strips");
            assert_eq!(decode_with_miniz(&png, width as usize * 3), raw, "{strips} strips (miniz)");
        }
    }

    #[test]
    fn flat_images_compress_to_a_sliver() {
        let raw = vec![42u8; 1000 * 300 * 3];
        let png = encode(&raw, 1000, 300, PixelKind::Rgb8, None);
        assert!(png.len() < raw.len() / 100, "{} bytes for {}", png.len(), raw.len());
    }

    #[test]
    fn runs_of_every_length_are_coded() {
        // Runs of 3..=600 repeated bytes, separated by a different byte.
        let mut raw = Vec::new();
        for run in 0..=600usize {
            raw.push(1);
            raw.extend(std::iter::repeat_n(0, run));
        }
        let width = raw.len() as u32;
        let png = encode_in_strips(&raw, width, 1, PixelKind::Gray8, None, 1);
        assert_eq!(decode_with_png_crate(&png).1, raw);
        assert_eq!(decode_with_miniz(&png, raw.len()), raw);
    }
}
