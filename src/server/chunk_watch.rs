//! Reads along with hyper as it parses a connection's requests, to see the
//! size a chunked body *declares* before any of its data arrives.
//!
//! hyper neither exposes a chunk's declared size nor limits it: a client that
//! says `ffffffffff\r\n` (a terabyte) and then sends nothing is only caught by
//! the upload timeout, and one that trickles data only once the bytes received
//! pass the body limit. Watching the framing lets the handler answer 413 the
//! moment a body declares more than any request may carry.
//!
//! The watcher only observes: it never changes what hyper reads. When it
//! meets something it does not follow (a head too large, a malformed chunk
//! line) it stops watching that connection for good, and hyper, which parses
//! the same bytes, answers or drops the connection as it does today.

/// Longest request head followed; hyper refuses longer heads itself.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line followed (hex digits plus extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Where in the byte stream the watcher is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// Reading a request head (request line and header fields).
    Head,
    /// Reading a chunk-size line.
    ChunkLine,
    /// Skipping this many bytes of chunk data.
    ChunkData(u64),
    /// Skipping the CRLF after a chunk's data; how many bytes of it are left.
    ChunkEnd(u8),
    /// Reading trailer fields after the last chunk.
    Trailers,
    /// Skipping this many bytes of a Content-Length body.
    FixedBody(u64),
    /// No longer watching: lost track, or already reported.
    Stopped,
}

/// Follows HTTP/1.1 request framing over the bytes of one connection.
#[derive(Debug)]
pub struct ChunkWatch {
    /// Largest body any request may declare.
    limit: u64,
    place: Place,
    /// The head, chunk line or trailer line being read.
    line: Vec<u8>,
    /// Bytes declared by the chunks of the current body so far.
    declared: u64,
}

impl ChunkWatch {
    pub fn new(limit: u64) -> ChunkWatch {
        ChunkWatch { limit, place: Place::Head, line: Vec::new(), declared: 0 }
    }

    /// Takes the next bytes read from the client. Returns the size declared by
    /// the current chunked body (saturating) the first time it passes the limit.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<u64> {
        while !bytes.is_empty() {
            match self.place.clone() {
                Place::Stopped => return None,
                Place::Head => {
                    let (used, complete) = self.take_line_bytes(bytes, b"\r\n\r\n", MAX_HEAD);
                    bytes = &bytes[used..];
                    if complete {
                        self.place = body_framing(&self.line);
                        self.line.clear();
                        self.declared = 0;
                    }
                }
                Place::ChunkLine => {
                    let (used, complete) = self.take_line_bytes(bytes, b"\r\n", MAX_CHUNK_LINE);
                    bytes = &bytes[used..];
                    if !complete {
                        continue;
                    }
                    let Some(size) = chunk_size(&self.line) else {
                        self.stop();
                        return None;
                    };
                    self.line.clear();
                    self.declared = self.declared.saturating_add(size);
                    if self.declared > self.limit {
                        self.stop();
                        return Some(self.declared);
                    }
                    self.place = if size == 0 { Place::Trailers } else { Place::ChunkData(size) };
                }
                Place::ChunkData(left) => {
                    let skip = left.min(bytes.len() as u64);
                    bytes = &bytes[skip as usize..];
                    self.place = if skip == left { Place::ChunkEnd(2) } else { Place::ChunkData(left - skip) };
                }
                Place::ChunkEnd(left) => {
                    let skip = usize::from(left).min(bytes.len());
                    bytes = &bytes[skip..];
                    self.place =
                        if skip == usize::from(left) { Place::ChunkLine } else { Place::ChunkEnd(left - skip as u8) };
                }
                Place::Trailers => {
                    // Trailer fields end with an empty line; with none, that is the CRLF right away.
                    let (used, complete) = self.take_line_bytes(bytes, b"\r\n", MAX_HEAD);
                    bytes = &bytes[used..];
                    if complete {
                        let empty = self.line == b"\r\n";
                        self.line.clear();
                        if empty {
                            self.place = Place::Head;
                        }
                    }
                }
                Place::FixedBody(left) => {
                    let skip = left.min(bytes.len() as u64);
                    bytes = &bytes[skip as usize..];
                    self.place = if skip == left { Place::Head } else { Place::FixedBody(left - skip) };
                }
            }
        }
        None
    }

    fn stop(&mut self) {
        self.place = Place::Stopped;
        self.line = Vec::new();
    }

    /// Appends bytes to `self.line` up to and including the first `end`
    /// (which may straddle reads). Returns the bytes used and whether `end` was
    /// reached; stops watching when the line grows past `max`.
    fn take_line_bytes(&mut self, bytes: &[u8], end: &[u8], max: usize) -> (usize, bool) {
        // Search from just before the new bytes, so an `end` split across reads is found.
        let start = self.line.len().saturating_sub(end.len() - 1);
        let room = max.saturating_sub(self.line.len()).min(bytes.len());
        self.line.extend_from_slice(&bytes[..room]);
        if let Some(at) = self.line[start..].windows(end.len()).position(|w| w == end) {
            let line_end = start + at + end.len();
            let used = room - (self.line.len() - line_end);
            self.line.truncate(line_end);
            return (used, true);
        }
        if room < bytes.len() {
            self.stop();
            return (bytes.len(), false);
        }
        (room, false)
    }
}

/// How the body after this request head is framed, as hyper decides it:
/// a `chunked` final transfer coding wins over Content-Length.
fn body_framing(head: &[u8]) -> Place {
    // Blank lines before a request line are allowed (RFC 9112 section 2.2) and arrive here as a bare CRLF head.
    let text = String::from_utf8_lossy(head);
    if text.trim().is_empty() {
        return Place::Head;
    }
    let mut chunked = false;
    let mut length: Option<u64> = None;
    for field in text.split("\r\n").skip(1) {
        let Some((name, value)) = field.split_once(':') else { continue };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<u64>() {
                Ok(n) => length = Some(n),
                Err(_) => return Place::Stopped,
            }
        }
    }
    match (chunked, length) {
        (true, _) => Place::ChunkLine,
        (false, Some(n)) if n > 0 => Place::FixedBody(n),
        _ => Place::Head,
    }
}

/// The size of a chunk-size line (`1a2b;ext=1\r\n`); more hex digits than a
/// u64 holds saturate (a declared size that large is over any limit anyway).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let digits_end = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
    if digits_end == 0 {
        return None;
    }
    let rest = &line[digits_end..];
    if !(rest.is_empty() || rest.starts_with(b";") || rest.starts_with(b" ") || rest.starts_with(b"\t")) {
        return None;
    }
    let mut size: u64 = 0;
    for &digit in &line[..digits_end] {
        let value = (digit as char).to_digit(16)? as u64;
        size = size.saturating_mul(16).saturating_add(value);
    }
    Some(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"POST /api/v1/disparity HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn feed_all(watch: &mut ChunkWatch, parts: &[&[u8]]) -> Option<u64> {
        parts.iter().find_map(|p| watch.feed(p))
    }

    #[test]
    fn reports_a_declared_size_over_the_limit_before_any_data() {
        let mut watch = ChunkWatch::new(1000);
        assert_eq!(feed_all(&mut watch, &[HEAD, b"ffffffffff\r\n"]), Some(0xff_ffff_ffff));
        // Reported once, then no longer watching.
        assert_eq!(watch.feed(b"abc"), None);
    }

    #[test]
    fn follows_byte_by_byte_reads() {
        let mut watch = ChunkWatch::new(1000);
        let stream = [HEAD, b"3e9;name=value\r\n"].concat();
        let reports: Vec<_> = stream.iter().filter_map(|b| watch.feed(std::slice::from_ref(b))).collect();
        assert_eq!(reports, vec![1001]);
    }

    #[test]
    fn sums_the_chunks_of_one_body_and_resets_for_the_next_request() {
        let mut watch = ChunkWatch::new(10);
        let first = [HEAD, b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"].concat();
        assert_eq!(watch.feed(&first), None);
        // A second request on the same connection starts counting again.
        assert_eq!(watch.feed(&[HEAD, b"a\r\n0123456789\r\n"].concat()), None);
        assert_eq!(watch.feed(b"1\r\n"), Some(11));
    }

    #[test]
    fn skips_content_length_bodies_and_trailers() {
        let mut watch = ChunkWatch::new(10);
        // The Content-Length body holds text that looks like a huge chunk line; it is skipped.
        let fixed = b"POST / HTTP/1.1\r\nContent-Length: 14\r\n\r\nffffffffff\r\n\r\n";
        assert_eq!(watch.feed(fixed), None);
        let trailers = [HEAD, b"0\r\nX-Sum: 1\r\n\r\n"].concat();
        assert_eq!(watch.feed(&trailers), None);
        assert_eq!(watch.feed(&[HEAD, b"b\r\n"].concat()), Some(11));
    }

    #[test]
    fn requests_without_a_body_and_split_head_ends() {
        let mut watch = ChunkWatch::new(10);
        let get = b"GET /api/v1/health HTTP/1.1\r\nHost: t\r\n\r\n";
        assert_eq!(watch.feed(get), None);
        // The head's end arrives split between two reads.
        let head = HEAD.len();
        assert_eq!(watch.feed(&HEAD[..head - 3]), None);
        assert_eq!(watch.feed(&HEAD[head - 3..]), None);
        assert_eq!(watch.feed(b"ff\r\n"), Some(255));
    }

    #[test]
    fn a_final_coding_other_than_chunked_or_a_malformed_line_stops_watching() {
        let mut watch = ChunkWatch::new(10);
        assert_eq!(watch.feed(&[HEAD, b"zz\r\nffffffff\r\n"].concat()), None);
        assert_eq!(watch.place, Place::Stopped);
        let mut watch = ChunkWatch::new(10);
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(watch.feed(head), None);
        assert_eq!(watch.place, Place::Head);
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"1A\r\n"), Some(26));
        assert_eq!(chunk_size(b"0\r\n"), Some(0));
        assert_eq!(chunk_size(b"10;a=b\r\n"), Some(16));
        assert_eq!(chunk_size(b"fffffffffffffffffffffff\r\n"), Some(u64::MAX));
        assert_eq!(chunk_size(b"\r\n"), None);
        assert_eq!(chunk_size(b"-1\r\n"), None);
        assert_eq!(chunk_size(b"12"), None);
    }
}
