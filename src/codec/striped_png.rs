//! Our PNG writer: the image cut into strips of rows that are filtered and
//! compressed side by side, one task a strip on the CPU pool.
//!
//! A PNG holds one zlib stream, which a single compressor writes in order; the
//! `png` crate's fastest setting (fdeflate) does so on one core, and at KITTI
//! size that was most of a `png16` or `color` answer's encoding. DEFLATE lets a
//! stream be cut into blocks, and a block may start anywhere once the previous
//! one ends on a byte boundary: an empty stored block after a strip's last
//! block puts it there (what zlib calls a sync flush). So each strip becomes
//! blocks of its own, made by its own task, and the strips' bytes are
//! concatenated. The decoded pixels are exactly the input (tested against the
//! image crate's decoder and miniz_oxide's inflate; browsers and Python's
//! zlib read them in the end-to-end tests); the compression is tuned for what
//! per-request images hold:
//!
//! - every row uses PNG's "Up" filter (the difference to the row above), so
//!   areas like the row above become runs of zeros;
//! - the only matches sought are repeats of the previous pixel (distance =
//!   bytes per pixel) at least eight bytes long, which is what Up-filtered
//!   flat areas and gradients give; no hash tables, one pass over the bytes;
//! - every block (about 64 K tokens) gets Huffman codes built from its own
//!   symbol counts (a "dynamic" block), so skewed filtered bytes take few bits.
//!
//! Why our own DEFLATE coding and not a maintained crate's: `make bench-request`
//! has each of them (zlib-rs levels 1 to 3 and RLE, miniz_oxide) compress the
//! same filtered strips with a sync flush. On the server's KITTI-sized maps the
//! best of them took 1.5 to 2.2 times as long as this writer (a JSON answer's
//! encoding 12.5 -> 16-17 ms on two cores) and wrote 13 to 19 % larger files
//! (docs/performance.md); fdeflate cannot end a strip on a byte boundary short
//! of ending the stream.
//!
//! The data flows, row by row in each strip's task: pixels -> filtered
//! bytes -> tokens (literal or run) -> symbol counts -> code lengths (at most
//! 15 bits) -> canonical codes -> bits.

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
    let compress = |k: usize| compress_strip(&fill_row, stride, bpp, ranges[k], k == last);
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

/// Tokens in one DEFLATE block (its Huffman codes are built from their
/// counts): 128 KiB of tokens stay in the core's cache between being made and
/// written, and a block's header (under 100 bytes) is a fraction of a percent.
const BLOCK_TOKENS: usize = 64 * 1024;

/// Rows `start..end`: each made by `fill_row`, filtered, checksummed and
/// cut into tokens; every [`BLOCK_TOKENS`] or so, the tokens are written as
/// one block. Nothing the size of the strip is made but the output, whose
/// first-touch page faults were a third of the time when the filtered bytes
/// and tokens of a whole strip were buffers of their own.
fn compress_strip<F>(
    fill_row: &F,
    stride: usize,
    bpp: usize,
    (start, end): (usize, usize),
    last: bool,
) -> CompressedStrip
where
    F: Fn(usize, &mut [u8]),
{
    let mut bits = BitWriter::with_capacity((end - start) * stride / 4);
    let mut adler = simd_adler32::Adler32::new();
    // The row above (zeros above the image) and this row, raw; then filtered.
    let mut above = vec![0u8; stride];
    let mut current = vec![0u8; stride];
    if start > 0 {
        fill_row(start - 1, &mut above);
    }
    let mut filtered = vec![0u8; stride + 1];
    let mut tokens: Vec<u16> = Vec::with_capacity(BLOCK_TOKENS + stride + 16);
    for y in start..end {
        fill_row(y, &mut current);
        filter_up(&current, &above, &mut filtered);
        std::mem::swap(&mut above, &mut current);
        adler.write(&filtered);
        tokenize(&filtered, bpp, &mut tokens);
        let strip_done = y + 1 == end;
        if tokens.len() >= BLOCK_TOKENS || strip_done {
            write_dynamic_block(&mut bits, &tokens, bpp, last && strip_done);
            tokens.clear();
        }
    }
    if !last {
        // An empty stored block: three header bits, then to the byte boundary,
        // then LEN = 0 and NLEN = !0. The next strip starts on a fresh byte.
        bits.put(0, 3);
        bits.align();
        bits.put(0xFFFF_0000, 32);
    }
    CompressedStrip { deflate: bits.finish(), adler: adler.finish(), filtered_len: (end - start) * (stride + 1) }
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

/// A token is a literal byte (below 256) or a run, `RUN + length - 3`: a
/// repeat of the bytes `bpp` back (the previous pixel), 3 to 258 bytes long.
const RUN: u16 = 256;
const MIN_RUN: usize = 3;
const MAX_RUN: usize = 258;

/// Appends the tokens of `data` to `tokens`.
///
/// A run starts only where eight bytes in a row repeat those `bpp` before
/// them, and literals are taken eight at a time where no such run can start:
/// if the byte 7 places ahead differs from its pixel before, no run of eight
/// can start before it. Deciding at every byte whether a 3-byte run starts
/// cost a mispredicted branch per token, which made this pass as slow as all
/// the rest of the writer, for a few percent of size.
fn tokenize(data: &[u8], bpp: usize, tokens: &mut Vec<u16>) {
    let n = data.len();
    // Written by index, eight at a time, with room for the last eight.
    let mut written = tokens.len();
    tokens.resize(written + n + 8, 0);
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("eight bytes"));
    let mut i = 0;
    while i + 8 <= n {
        let differ = if i >= bpp { word(i) ^ word(i - bpp) } else { u64::MAX };
        if differ == 0 {
            let run = 8 + run_length(data, i + 8, bpp, (n - i).min(MAX_RUN) - 8);
            tokens[written] = RUN + (run - MIN_RUN) as u16;
            written += 1;
            i += run;
            continue;
        }
        // Bytes up to the last differing one of these eight are literals.
        let literals = 8 - (differ.leading_zeros() / 8) as usize;
        for (slot, &byte) in tokens[written..written + 8].iter_mut().zip(&data[i..i + 8]) {
            *slot = u16::from(byte);
        }
        written += literals;
        i += literals;
    }
    for &byte in &data[i..] {
        tokens[written] = u16::from(byte);
        written += 1;
    }
    tokens.truncate(written);
}

/// How many bytes from `at` on (at most `max`) equal those `bpp` before them.
#[inline]
fn run_length(data: &[u8], at: usize, bpp: usize, max: usize) -> usize {
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("eight bytes"));
    let mut run = 0;
    while run + 8 <= max {
        let differ = word(at + run) ^ word(at + run - bpp);
        if differ != 0 {
            return run + (differ.trailing_zeros() / 8) as usize;
        }
        run += 8;
    }
    while run < max && data[at + run] == data[at + run - bpp] {
        run += 1;
    }
    run
}

/// DEFLATE's length symbols: (first length, extra bits) of symbols 257..=285.
const LENGTH_CODES: [(u16, u8); 29] = [
    (3, 0),
    (4, 0),
    (5, 0),
    (6, 0),
    (7, 0),
    (8, 0),
    (9, 0),
    (10, 0),
    (11, 1),
    (13, 1),
    (15, 1),
    (17, 1),
    (19, 2),
    (23, 2),
    (27, 2),
    (31, 2),
    (35, 3),
    (43, 3),
    (51, 3),
    (59, 3),
    (67, 4),
    (83, 4),
    (99, 4),
    (115, 4),
    (131, 5),
    (163, 5),
    (195, 5),
    (227, 5),
    (258, 0),
];

/// (symbol, extra bits, their value) of a run length, 3..=258.
fn length_symbol(length: usize) -> (usize, u8, u32) {
    // 258 has a symbol of its own, although 227 + 31 would also reach it.
    let index = if length == MAX_RUN {
        28
    } else {
        LENGTH_CODES[..28].iter().rposition(|&(first, _)| usize::from(first) <= length).expect("length >= 3")
    };
    let (first, extra) = LENGTH_CODES[index];
    (257 + index, extra, (length - usize::from(first)) as u32)
}

/// The precomputed (symbol, extra bits, value) of every run length.
fn length_table() -> &'static [(u16, u8, u16); MAX_RUN + 1] {
    static TABLE: std::sync::OnceLock<[(u16, u8, u16); MAX_RUN + 1]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [(0, 0, 0); MAX_RUN + 1];
        for (length, entry) in table.iter_mut().enumerate().skip(MIN_RUN) {
            let (symbol, extra, value) = length_symbol(length);
            *entry = (symbol as u16, extra, value as u16);
        }
        table
    })
}

const END_OF_BLOCK: usize = 256;
const LITERAL_LENGTH_SYMBOLS: usize = 286;

/// How often each literal/length symbol occurs among `tokens`, end of block
/// included. Counted per token first (no branch: 512 counters), then the
/// runs' lengths gathered into their symbols. Four tables take turns: with
/// one, runs of equal tokens (zeros, mostly) made each increment wait for the
/// previous one's store, a quarter of the writer's time.
fn symbol_counts(tokens: &[u16]) -> [u32; LITERAL_LENGTH_SYMBOLS] {
    let mut tables = [[0u32; 512]; 4];
    let quads = tokens.chunks_exact(4);
    for &token in quads.remainder() {
        tables[0][usize::from(token) & 511] += 1;
    }
    for quad in quads {
        for (table, &token) in tables.iter_mut().zip(quad) {
            table[usize::from(token) & 511] += 1;
        }
    }
    let mut per_token = [0u32; 512];
    for table in &tables {
        for (sum, &n) in per_token.iter_mut().zip(table) {
            *sum += n;
        }
    }
    let mut counts = [0u32; LITERAL_LENGTH_SYMBOLS];
    counts[..256].copy_from_slice(&per_token[..256]);
    for (length, &n) in (MIN_RUN..=MAX_RUN).zip(&per_token[256..]) {
        counts[usize::from(length_table()[length].0)] += n;
    }
    counts[END_OF_BLOCK] = 1;
    counts
}

/// One dynamic-Huffman block holding all of `tokens`.
fn write_dynamic_block(bits: &mut BitWriter, tokens: &[u16], bpp: usize, last: bool) {
    let counts = symbol_counts(tokens);
    let literal_lengths = huffman_lengths(&counts, 15);
    let literal_codes = canonical_codes(&literal_lengths);

    // Runs all have the distance `bpp` (symbol bpp - 1, no extra bits). A lone
    // code of one bit is legal but some decoders frown on it; a second, unused
    // code of one bit makes the tree complete.
    let distance_symbol = bpp - 1;
    let mut distance_lengths = vec![0u8; distance_symbol.max(1) + 1];
    distance_lengths[distance_symbol] = 1;
    distance_lengths[if distance_symbol == 0 { 1 } else { 0 }] = 1;
    let distance_code = u64::from(canonical_codes(&distance_lengths)[distance_symbol]);

    let literal_count = literal_lengths.iter().rposition(|&l| l > 0).map_or(257, |p| p + 1).max(257);
    bits.put(u64::from(last), 1);
    bits.put(2, 2); // BTYPE 10: dynamic Huffman codes
    write_code_lengths(bits, &literal_lengths[..literal_count], &distance_lengths);

    // Every token's whole bit field, precomputed and packed as `bits | count
    // << 26`: a run's is its length symbol, the extra bits and the one-bit
    // distance code together (at most 21 bits).
    let field = |symbol: usize| (u64::from(literal_codes[symbol]), u32::from(literal_lengths[symbol]));
    let mut fields = [0u32; 512];
    for (token, slot) in fields.iter_mut().enumerate().take(256 + MAX_RUN - MIN_RUN + 1) {
        let (value, count) = if token < 256 {
            field(token)
        } else {
            let (symbol, extra, value) = length_table()[token - 256 + MIN_RUN];
            let (code, len) = field(usize::from(symbol));
            let with_extra = code | (u64::from(value) << len);
            (with_extra | (distance_code << (len + u32::from(extra))), len + u32::from(extra) + 1)
        };
        *slot = value as u32 | (count << 26);
    }
    // Two tokens a store: their fields together are at most 42 bits.
    let unpack = |token: u16| {
        let packed = fields[usize::from(token) & 511];
        (u64::from(packed & ((1 << 26) - 1)), packed >> 26)
    };
    let pairs = tokens.chunks_exact(2);
    let odd = pairs.remainder().first().copied();
    bits.put_all(pairs.map(|pair| {
        let ((first, n1), (second, n2)) = (unpack(pair[0]), unpack(pair[1]));
        (first | (second << n1), n1 + n2)
    }));
    if let Some(token) = odd {
        let (value, count) = unpack(token);
        bits.put(value, count);
    }
    let (value, count) = field(END_OF_BLOCK);
    bits.put(value, count);
}

/// Order in which a dynamic block lists the code lengths of its code-length alphabet.
const CODE_LENGTH_ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

/// The block header after BTYPE: HLIT, HDIST, HCLEN, the code-length code and
/// both alphabets' code lengths, runs of zeros shortened with symbols 17 and 18.
fn write_code_lengths(bits: &mut BitWriter, literal_lengths: &[u8], distance_lengths: &[u8]) {
    // (symbol, extra bits, value) of the code-length alphabet.
    let mut symbols: Vec<(u8, u8, u8)> = Vec::new();
    let all: Vec<u8> = literal_lengths.iter().chain(distance_lengths).copied().collect();
    let mut i = 0;
    while i < all.len() {
        let zeros = all[i..].iter().take_while(|&&l| l == 0).count();
        if zeros >= 11 {
            let n = zeros.min(138);
            symbols.push((18, 7, (n - 11) as u8));
            i += n;
        } else if zeros >= 3 {
            symbols.push((17, 3, (zeros - 3) as u8));
            i += zeros;
        } else {
            symbols.push((all[i], 0, 0));
            i += 1;
        }
    }
    let mut counts = [0u32; 19];
    for &(symbol, _, _) in &symbols {
        counts[usize::from(symbol)] += 1;
    }
    let lengths = huffman_lengths(&counts, 7);
    let codes = canonical_codes(&lengths);
    let listed = CODE_LENGTH_ORDER.iter().rposition(|&s| lengths[s] > 0).map_or(4, |p| p + 1).max(4);

    bits.put((literal_lengths.len() - 257) as u64, 5);
    bits.put((distance_lengths.len() - 1) as u64, 5);
    bits.put((listed - 4) as u64, 4);
    for &symbol in &CODE_LENGTH_ORDER[..listed] {
        bits.put(u64::from(lengths[symbol]), 3);
    }
    for (symbol, extra, value) in symbols {
        let s = usize::from(symbol);
        bits.put(u64::from(codes[s]), u32::from(lengths[s]));
        bits.put(u64::from(value), u32::from(extra));
    }
}

/// Huffman code lengths for `counts` (0 = symbol unused), none longer than
/// `limit`. Past the limit the counts are halved (keeping used symbols at 1
/// or more) and the code rebuilt: it converges, since equal counts give a
/// balanced tree, and costs a little compression only on rare skewed inputs.
/// A lone used symbol gets a partner so that the code is complete.
fn huffman_lengths(counts: &[u32], limit: u8) -> Vec<u8> {
    let mut weights: Vec<u64> = counts.iter().map(|&c| u64::from(c)).collect();
    if weights.iter().filter(|&&w| w > 0).count() == 1 {
        let partner = if weights[0] == 0 { 0 } else { 1 };
        weights[partner] = 1;
    }
    loop {
        let lengths = unlimited_huffman_lengths(&weights);
        if lengths.iter().all(|&l| l <= limit) {
            return lengths;
        }
        for w in weights.iter_mut().filter(|w| **w > 0) {
            *w = (*w).div_ceil(2);
        }
    }
}

/// Huffman's construction with two queues: the leaves sorted by weight,
/// and the merged nodes, which are made in order of weight; the two lightest
/// nodes are always at the queues' fronts. A leaf's length is its depth.
/// (A binary heap took a tenth of the writer's time.)
fn unlimited_huffman_lengths(weights: &[u64]) -> Vec<u8> {
    let mut lengths = vec![0u8; weights.len()];
    let mut leaves: Vec<usize> = (0..weights.len()).filter(|&s| weights[s] > 0).collect();
    if leaves.len() < 2 {
        return lengths;
    }
    leaves.sort_by_key(|&s| (weights[s], s));
    let n = leaves.len();
    // Nodes 0..n are the leaves in sorted order, n.. the merges as made.
    let mut weight: Vec<u64> = leaves.iter().map(|&s| weights[s]).collect();
    let mut parent = vec![usize::MAX; n];
    let (mut next_leaf, mut next_merged) = (0, n);
    let mut lightest = |weight: &[u64]| {
        // Ties go to the leaf, which keeps the tree shallower.
        if next_leaf < n && (next_merged >= weight.len() || weight[next_leaf] <= weight[next_merged]) {
            next_leaf += 1;
            next_leaf - 1
        } else {
            next_merged += 1;
            next_merged - 1
        }
    };
    for _ in 1..n {
        let a = lightest(&weight);
        let b = lightest(&weight);
        let merged = weight.len();
        weight.push(weight[a] + weight[b]);
        parent.push(usize::MAX);
        parent[a] = merged;
        parent[b] = merged;
    }
    // A node's parent was made after it, so depths fill from the root down.
    let mut depth = vec![0u8; parent.len()];
    for node in (0..parent.len() - 1).rev() {
        depth[node] = depth[parent[node]] + 1;
    }
    for (node, &symbol) in leaves.iter().enumerate() {
        lengths[symbol] = depth[node];
    }
    lengths
}

/// Canonical Huffman codes of `lengths` (RFC 1951, 3.2.2), bit-reversed,
/// since DEFLATE sends a code's first bit in the lowest bit of the stream.
fn canonical_codes(lengths: &[u8]) -> Vec<u16> {
    let mut per_length = [0u16; 16];
    for &l in lengths.iter().filter(|&&l| l > 0) {
        per_length[usize::from(l)] += 1;
    }
    let mut next = [0u16; 16];
    let mut code = 0u16;
    for bits in 1..16 {
        code = (code + per_length[bits - 1]) << 1;
        next[bits] = code;
    }
    lengths
        .iter()
        .map(|&l| {
            if l == 0 {
                return 0;
            }
            let c = next[usize::from(l)];
            next[usize::from(l)] += 1;
            c.reverse_bits() >> (16 - l)
        })
        .collect()
}

/// Writes bit fields lowest bit first, as DEFLATE packs them.
///
/// Branch-free: every `put` stores the whole 64-bit buffer at the write
/// position and advances by the bytes completed, so room is made before
/// (`reserve`: the output's length runs ahead of the bytes written). A
/// branch on "buffer full" was taken at no predictable rhythm and cost
/// about as much as the rest of writing a token.
struct BitWriter {
    out: Vec<u8>,
    at: usize,
    buffer: u64,
    filled: u32,
}

impl BitWriter {
    fn with_capacity(bytes: usize) -> BitWriter {
        let mut writer = BitWriter { out: Vec::with_capacity(bytes), at: 0, buffer: 0, filled: 0 };
        writer.reserve(0);
        writer
    }

    /// Room for `bytes` more bytes of fields (and the 8-byte stores past them).
    fn reserve(&mut self, bytes: usize) {
        let needed = self.at + bytes + 16;
        if self.out.len() < needed {
            self.out.resize(needed, 0);
        }
    }

    /// Appends the low `count` bits of `value` (at most 32), making room.
    #[inline]
    fn put(&mut self, value: u64, count: u32) {
        debug_assert!(count <= 32 && value.checked_shr(count).unwrap_or(0) == 0);
        self.reserve(4);
        // At most 7 bits wait in the buffer between calls, so 7 + 32 fit.
        self.buffer |= value << self.filled;
        self.filled += count;
        self.out[self.at..self.at + 8].copy_from_slice(&self.buffer.to_le_bytes());
        let whole = self.filled / 8;
        self.at += whole as usize;
        self.buffer >>= whole * 8;
        self.filled %= 8;
    }

    /// `put` of every field (each at most 48 bits), with the writer's state in
    /// locals: through `&mut self` each store into the output could alias the
    /// state, so the compiler reloaded it from memory for every field.
    #[inline]
    fn put_all(&mut self, fields: impl ExactSizeIterator<Item = (u64, u32)>) {
        self.reserve(fields.len() * 6);
        let (mut buffer, mut filled, mut at) = (self.buffer, self.filled, self.at);
        let out = self.out.as_mut_slice();
        for (value, count) in fields {
            buffer |= value << filled;
            filled += count;
            out[at..at + 8].copy_from_slice(&buffer.to_le_bytes());
            let whole = filled / 8;
            at += whole as usize;
            buffer >>= whole * 8;
            filled %= 8;
        }
        (self.buffer, self.filled, self.at) = (buffer, filled, at);
    }

    /// Zero bits up to the next byte boundary.
    fn align(&mut self) {
        self.put(0, (8 - self.filled % 8) % 8);
    }

    fn finish(mut self) -> Vec<u8> {
        self.align();
        self.out.truncate(self.at);
        self.out
    }
}

const ADLER_MOD: u32 = 65_521;

/// Adler-32 of X followed by Y from those of X and Y and Y's length: with
/// A = 1 + sum of bytes and B = the sum of A after each byte, Y's bytes each
/// add X's (A - 1) once more to B than they did alone.
fn adler32_concat(first: u32, second: u32, second_len: usize) -> u32 {
    let (a1, b1) = (first & 0xFFFF, first >> 16);
    let (a2, b2) = (second & 0xFFFF, second >> 16);
    let m = u64::from(ADLER_MOD);
    let a = (u64::from(a1) + u64::from(a2) + m - 1) % m;
    let shift = (second_len as u64 % m) * ((u64::from(a1) + m - 1) % m) % m;
    let b = (u64::from(b1) + u64::from(b2) + shift) % m;
    ((b as u32) << 16) | a as u32
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

    let adler = parts.iter().skip(1).fold(parts[0].adler, |sum, p| adler32_concat(sum, p.adler, p.filtered_len));
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
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    out.extend_from_slice(kind);
    for piece in pieces {
        crc.update(piece);
        out.extend_from_slice(piece);
    }
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adler-32 of `data` (zlib's checksum of the uncompressed bytes).
    fn adler32(data: &[u8]) -> u32 {
        let mut hash = simd_adler32::Adler32::new();
        hash.write(data);
        hash.finish()
    }

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
        // Noise: about a token a byte, so each strip holds several blocks.
        let (width, height) = (1000u32, 200u32);
        let raw = image_like(width as usize * height as usize * 3, 11)
            .iter()
            .enumerate()
            .map(|(i, &b)| b ^ (i as u8).wrapping_mul(151))
            .collect::<Vec<u8>>();
        assert!(raw.len() / 2 > 2 * BLOCK_TOKENS);
        for strips in [1, 2] {
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

    #[test]
    fn length_symbols_follow_rfc_1951() {
        assert_eq!(length_symbol(3), (257, 0, 0));
        assert_eq!(length_symbol(10), (264, 0, 0));
        assert_eq!(length_symbol(11), (265, 1, 0));
        assert_eq!(length_symbol(12), (265, 1, 1));
        assert_eq!(length_symbol(130), (280, 4, 15));
        assert_eq!(length_symbol(257), (284, 5, 30));
        assert_eq!(length_symbol(258), (285, 0, 0));
    }

    #[test]
    fn huffman_lengths_respect_the_limit_and_form_a_complete_code() {
        // Fibonacci counts give the deepest possible tree (one level per symbol).
        let mut counts = vec![1u32, 1];
        while counts.len() < 30 {
            counts.push(counts[counts.len() - 1] + counts[counts.len() - 2]);
        }
        for limit in [7, 15] {
            let lengths = huffman_lengths(&counts, limit);
            assert!(lengths.iter().all(|&l| (1..=limit).contains(&l)), "{lengths:?}");
            let kraft: f64 = lengths.iter().map(|&l| 0.5f64.powi(i32::from(l))).sum();
            assert!((kraft - 1.0).abs() < 1e-12, "Kraft sum {kraft}");
        }
        // One used symbol still gets a complete one-bit code.
        let lengths = huffman_lengths(&[0, 0, 5, 0], 15);
        assert_eq!(lengths.iter().filter(|&&l| l == 1).count(), 2);
    }

    #[test]
    fn canonical_codes_match_the_rfc_example() {
        // RFC 1951 3.2.2: lengths (3, 3, 3, 3, 3, 2, 4, 4) give 010 011 100 101 110 00 1110 1111.
        let codes = canonical_codes(&[3, 3, 3, 3, 3, 2, 4, 4]);
        let expected: [u16; 8] = [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111];
        let lengths = [3, 3, 3, 3, 3, 2, 4, 4];
        for ((code, want), len) in codes.iter().zip(expected).zip(lengths) {
            assert_eq!(code.reverse_bits() >> (16 - len), want);
        }
    }

    #[test]
    fn adler_of_concatenated_strips_equals_adler_of_the_whole() {
        let data = image_like(50_000, 9);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        for cut in [0, 1, 5551, 5552, 20_000, 50_000] {
            let (x, y) = data.split_at(cut);
            assert_eq!(adler32_concat(adler32(x), adler32(y), y.len()), adler32(&data), "cut at {cut}");
        }
    }
}
