//! Where a request's time goes around inference: `make bench-request`.
//!
//! Two tables, for each size (default KITTI's 1242x375 and the synthetic
//! scene's 512x384) and each answer format (json, color, png16, pfm):
//!
//! 1. In process, the server's own functions timed step by step (median of
//!    `--iters` runs): decoding each upload and the pair as the server does it,
//!    then each format's encoding, split into its parts for JSON. The disparity
//!    map encoded is a real prediction of the pair (one CPU inference per size).
//! 2. Over loopback, against the real server binary (`--server-bin`, default
//!    the one cargo built): `--requests` requests per format, the medians of
//!    the server's `Server-Timing` phases, of what the client saw, and of the
//!    client's time minus the server's inference (upload, decode, queue,
//!    encode and download together). `--server-bin` may be given several
//!    times (an older build, then this one) to A/B them in one run.
//!
//! `cargo bench --bench request -- [--sizes 1242x375,512x384] [--iters 15]
//!  [--requests 5] [--formats json,color,png16,pfm] [--no-http] [--no-phases]
//!  [--server-bin PATH] [--json OUT]`
//!
//! The pairs: `../shared/stereo/kitti_000001` (real KITTI photographs) resized
//! to each size when present, else the synthetic scene in `data/`.

#[path = "../common/loadgen.rs"]
mod loadgen;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use loadgen::{multipart, ServerProcess};
use serde_json::json;
use stereo_recon::codec::{colormap, kitti, pfm, striped_png, PixelKind};
use stereo_recon::decode::{decode_pair, decode_rgb};
use stereo_recon::disparity::DisparityMap;
use stereo_recon::engine::{DeviceChoice, Engine, EngineConfig, MemoryFormat, Precision, StereoPair};
use stereo_recon::pipeline::answer::{encode_answer, AnswerContext};
use stereo_recon::pipeline::OutputFormat;
use tokio::io::{AsyncWriteExt, BufReader};

const FORMATS: [&str; 4] = ["json", "color", "png16", "pfm"];

struct Options {
    sizes: Vec<(u32, u32)>,
    iters: usize,
    requests: usize,
    formats: Vec<String>,
    phases: bool,
    http: bool,
    model: PathBuf,
    /// Server builds to compare, each measured in turn in this run (A/B).
    server_bins: Vec<PathBuf>,
    json: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        sizes: vec![(1242, 375), (512, 384)],
        iters: 15,
        requests: 5,
        formats: FORMATS.map(String::from).to_vec(),
        phases: true,
        http: true,
        model: std::env::var("STEREO_RECON_MODEL").unwrap_or_else(|_| "models/psmnet_kitti2015.pt".into()).into(),
        server_bins: Vec::new(),
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--sizes" => {
                o.sizes = value()
                    .split(',')
                    .map(|s| {
                        let (w, h) = s.split_once('x').expect("--sizes WxH,WxH");
                        (w.parse().expect("width"), h.parse().expect("height"))
                    })
                    .collect()
            }
            "--iters" => o.iters = value().parse().expect("--iters N"),
            "--requests" => o.requests = value().parse().expect("--requests N"),
            "--formats" => o.formats = value().split(',').map(String::from).collect(),
            "--no-http" => o.http = false,
            "--no-phases" => o.phases = false,
            "--model" => o.model = value().into(),
            "--server-bin" => o.server_bins.push(value().into()),
            "--json" => o.json = Some(value().into()),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    if o.server_bins.is_empty() {
        let default = std::env::var_os("STEREO_RECON_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_stereo-recon").into());
        o.server_bins.push(default.into());
    }
    o
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Median milliseconds of `iters` runs of `f`.
fn time_ms<T>(iters: usize, mut f: impl FnMut() -> T) -> f64 {
    median(
        (0..iters)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(f());
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    )
}

/// The benchmark pair at `width x height`, as PNG files a camera pipeline
/// would write (the image crate's default compression).
fn pair_at(width: u32, height: u32) -> (Vec<u8>, Vec<u8>) {
    let shared = Path::new("../shared/stereo/kitti_000001");
    let dir = if shared.join("left.png").is_file() { shared } else { Path::new("data/synthetic") };
    let load = |name: &str| {
        let path = dir.join(name);
        let image = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
        let image = if image.dimensions() == (width, height) {
            image
        } else {
            image::imageops::resize(&image, width, height, image::imageops::FilterType::CatmullRom)
        };
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    (load("left.png"), load("right.png"))
}

fn format_of(name: &str) -> OutputFormat {
    OutputFormat::from_label(name).unwrap_or_else(|| panic!("unknown format {name}"))
}

/// Table 1: the server's functions, step by step.
fn phases(o: &Options, engine: &Engine, runtime: &tokio::runtime::Runtime) -> serde_json::Value {
    let mut rows = Vec::new();
    for &(width, height) in &o.sizes {
        let (left, right) = pair_at(width, height);
        let (l, r) = decode_pair(&left, &right, u64::MAX).expect("the pair decodes");
        let pair = StereoPair::new(l, r).expect("one size");
        // With the deviation, which the JSON answer carries (statistics and image).
        let prediction = runtime.block_on(engine.predict_with_uncertainty(pair)).expect("inference");
        let map: DisparityMap = prediction.disparity;
        let sigma = prediction.uncertainty.expect("asked for");
        let mut row = BTreeMap::new();
        row.insert("decode_left", time_ms(o.iters, || decode_rgb(&left, u64::MAX).unwrap()));
        row.insert("decode_right", time_ms(o.iters, || decode_rgb(&right, u64::MAX).unwrap()));
        row.insert("png_inflate_left", time_ms(o.iters, || image::load_from_memory(&left).unwrap()));
        row.insert("decode_pair", time_ms(o.iters, || decode_pair(&left, &right, u64::MAX).unwrap()));
        let stats = map.stats();
        row.insert("colorize", time_ms(o.iters, || colormap::colorize(&map, stats.min, stats.max)));
        row.insert("color_png", time_ms(o.iters, || colormap::color_png(&map)));
        row.insert("png16", time_ms(o.iters, || kitti::encode_png16(&map)));
        row.insert("pfm", time_ms(o.iters, || pfm::encode(&map)));
        // The deviation's parts of a JSON answer.
        row.insert("sigma_stats", time_ms(o.iters, || stereo_recon::uncertainty::stats_and_p99(&sigma)));
        let top = stereo_recon::uncertainty::stats_and_p99(&sigma).1;
        row.insert("sigma_color_png", time_ms(o.iters, || colormap::palette_png_between(&sigma, 0.0, top)));
        row.insert("sigma_rgb_png", time_ms(o.iters, || colormap::color_png_between(&sigma, 0.0, top)));
        println!(
            "deviation PNG: {} bytes with a palette, {} true-colour",
            colormap::palette_png_between(&sigma, 0.0, top).len(),
            colormap::color_png_between(&sigma, 0.0, top).len()
        );
        // What each PNG filter costs and saves on this map (the choice in codec::png_bytes).
        let colour_raw = colormap::colorize(&map, stats.min, stats.max).into_raw();
        let png16_raw: Vec<u8> = map.values().iter().flat_map(|&d| kitti::encode_value(d).to_ne_bytes()).collect();
        let mut filters = BTreeMap::new();
        for filter in [
            FilterType::NoFilter,
            FilterType::Sub,
            FilterType::Up,
            FilterType::Avg,
            FilterType::Paeth,
            FilterType::Adaptive,
        ] {
            for (what, raw, colour) in
                [("color", &colour_raw, ExtendedColorType::Rgb8), ("png16", &png16_raw, ExtendedColorType::L16)]
            {
                let encode = || {
                    let mut out = Vec::new();
                    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, filter)
                        .write_image(raw, width, height, colour)
                        .unwrap();
                    out
                };
                let bytes = encode().len();
                filters.insert(format!("{what} {filter:?}"), (time_ms(o.iters, encode), bytes));
            }
        }
        println!("\nPNG filters at {width}x{height} (fast deflate): ms, bytes");
        for (name, (ms, bytes)) in &filters {
            println!("  {name:<18} {ms:7.2} {bytes:>9}");
        }
        let writers = png_writers(o.iters, &colour_raw, &png16_raw, width, height);
        for name in &o.formats {
            let context = AnswerContext {
                format: format_of(name),
                include_pfm: false,
                truth: None,
                reconstruction: None,
                max_uncertainty: None,
                ply_uncertainty: false,
            };
            let key: &'static str = match name.as_str() {
                "json" => "encode_json",
                "color" => "encode_color",
                "png16" => "encode_png16",
                _ => "encode_pfm",
            };
            row.insert(key, time_ms(o.iters, || encode_answer(&context, &map, Some(&sigma))));
            if name == "json" {
                // The JSON answer as it was before it carried the deviation (statistics, image).
                row.insert("encode_json_no_sigma", time_ms(o.iters, || encode_answer(&context, &map, None)));
            }
        }
        println!("\nin process, {width}x{height} (median of {} runs, ms):", o.iters);
        for (step, ms) in &row {
            println!("  {step:<14} {ms:8.2}");
        }
        rows.push(json!({
            "size": format!("{width}x{height}"),
            "ms": row,
            "png_filters_ms_bytes": filters,
            "png_writers_ms_bytes": writers,
        }));
    }
    json!(rows)
}

/// The PNG writers on the same pixels (Up filter): the `png` crate's fastest
/// setting (fdeflate, one thread: what the server used before its own
/// writer) against `striped_png` in one strip and in one strip a core.
fn png_writers(
    iters: usize,
    colour_raw: &[u8],
    png16_native: &[u8],
    width: u32,
    height: u32,
) -> BTreeMap<String, (f64, usize)> {
    let png16_raw: Vec<u8> =
        png16_native.chunks_exact(2).flat_map(|s| u16::from_ne_bytes([s[0], s[1]]).to_be_bytes()).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut table = BTreeMap::new();
    for (what, raw, kind, colour, depth) in [
        ("color", colour_raw, PixelKind::Rgb8, png::ColorType::Rgb, png::BitDepth::Eight),
        ("png16", &png16_raw[..], PixelKind::Gray16, png::ColorType::Grayscale, png::BitDepth::Sixteen),
    ] {
        let fdeflate = || {
            let mut out = Vec::new();
            let mut encoder = png::Encoder::new(&mut out, width, height);
            encoder.set_color(colour);
            encoder.set_depth(depth);
            encoder.set_compression(png::Compression::Fast);
            encoder.set_filter(png::Filter::Up);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(raw).unwrap();
            writer.finish().unwrap();
            out
        };
        let one_strip = || striped_png::encode_in_strips(raw, width, height, kind, None, 1);
        let per_core = || striped_png::encode(raw, width, height, kind, None);
        table.insert(format!("{what} png crate (fdeflate)"), (time_ms(iters, fdeflate), fdeflate().len()));
        table.insert(format!("{what} striped, 1 strip"), (time_ms(iters, one_strip), one_strip().len()));
        table.insert(format!("{what} striped, {cores} cores"), (time_ms(iters, per_core), per_core().len()));
    }
    deflate_per_strip(iters, &mut table, colour_raw, &png16_raw, width, height, cores);
    println!("\nPNG writers at {width}x{height} (Up filter): ms, bytes");
    for (name, (ms, bytes)) in &table {
        println!("  {name:<30} {ms:7.2} {bytes:>9}");
    }
    table
}

/// Each maintained DEFLATE crate writing the same Up-filtered strips (one per
/// core, side by side on the CPU pool, each ending on a byte boundary with a
/// sync flush but the last): the candidates for the PNG writer's coding. Times
/// include the filtering; sizes are the deflate bytes of all strips.
fn deflate_per_strip(
    iters: usize,
    table: &mut BTreeMap<String, (f64, usize)>,
    colour_raw: &[u8],
    png16_raw: &[u8],
    width: u32,
    height: u32,
    cores: usize,
) {
    use rayon::prelude::*;
    type Deflate = fn(&[u8], bool) -> Vec<u8>;
    fn zlib_rs(level: i32, strategy: zlib_rs::Strategy, mem_level: i32, input: &[u8], last: bool) -> Vec<u8> {
        let config = zlib_rs::DeflateConfig { level, window_bits: -15, strategy, mem_level, ..Default::default() };
        let mut compressor = zlib_rs::Deflate::new_with_config(config);
        let mut out = Vec::with_capacity(zlib_rs::compress_bound(input.len()) + 16);
        let flush = if last { zlib_rs::DeflateFlush::Finish } else { zlib_rs::DeflateFlush::SyncFlush };
        compressor.compress_uninit(input, out.spare_capacity_mut(), flush).expect("room for the whole strip");
        assert_eq!(compressor.total_in(), input.len() as u64);
        // SAFETY: zlib-rs wrote the first total_out bytes of the spare capacity.
        unsafe { out.set_len(compressor.total_out() as usize) };
        out
    }
    fn miniz(level: u8, rle: bool, input: &[u8], last: bool) -> Vec<u8> {
        use miniz_oxide::deflate::core::{compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush};
        let strategy = if rle { 3 } else { 0 };
        let mut compressor = CompressorOxide::new(create_comp_flags_from_zip_params(level.into(), -15, strategy));
        let mut out = vec![0; input.len() + input.len() / 8 + 64];
        let flush = if last { TDEFLFlush::Finish } else { TDEFLFlush::Sync };
        let (_, consumed, written) = compress(&mut compressor, input, &mut out, flush);
        assert_eq!(consumed, input.len());
        out.truncate(written);
        out
    }
    use zlib_rs::Strategy::{Default as Plain, HuffmanOnly, Rle};
    let candidates: [(&str, Deflate); 11] = [
        ("zlib-rs level 1", |i, l| zlib_rs(1, Plain, 8, i, l)),
        ("zlib-rs level 2", |i, l| zlib_rs(2, Plain, 8, i, l)),
        ("zlib-rs level 3", |i, l| zlib_rs(3, Plain, 8, i, l)),
        ("zlib-rs rle", |i, l| zlib_rs(1, Rle, 8, i, l)),
        ("zlib-rs huffman only", |i, l| zlib_rs(1, HuffmanOnly, 8, i, l)),
        ("zlib-rs level 1 mem 9", |i, l| zlib_rs(1, Plain, 9, i, l)),
        ("zlib-rs level 2 mem 9", |i, l| zlib_rs(2, Plain, 9, i, l)),
        ("zlib-rs rle mem 9", |i, l| zlib_rs(1, Rle, 9, i, l)),
        ("zlib-rs huffman only mem 9", |i, l| zlib_rs(1, HuffmanOnly, 9, i, l)),
        ("miniz_oxide level 1", |i, l| miniz(1, false, i, l)),
        ("miniz_oxide rle", |i, l| miniz(1, true, i, l)),
    ];
    for (what, raw, bpp) in [("color", colour_raw, 3usize), ("png16", png16_raw, 2usize)] {
        let stride = width as usize * bpp;
        let rows = height as usize;
        let per_strip = rows.div_ceil(cores.clamp(1, rows));
        let ranges: Vec<(usize, usize)> =
            (0..rows).step_by(per_strip).map(|s| (s, (s + per_strip).min(rows))).collect();
        let filtered = |(start, end): (usize, usize)| -> Vec<u8> {
            let mut out = Vec::with_capacity((end - start) * (stride + 1));
            for y in start..end {
                out.push(2);
                let row = &raw[y * stride..(y + 1) * stride];
                if y == 0 {
                    out.extend_from_slice(row);
                } else {
                    let above = &raw[(y - 1) * stride..y * stride];
                    out.extend(row.iter().zip(above).map(|(b, a)| b.wrapping_sub(*a)));
                }
            }
            out
        };
        for (name, deflate) in candidates {
            let last = ranges.len() - 1;
            let run = || -> usize {
                ranges.par_iter().enumerate().map(|(k, &range)| deflate(&filtered(range), k == last).len()).sum()
            };
            table.insert(format!("{what} {name}, {} strips", ranges.len()), (time_ms(iters, run), run()));
        }
    }
}

/// The phases of one `Server-Timing` header, by name.
fn server_timing(header: &str) -> BTreeMap<String, f64> {
    header
        .split(',')
        .filter_map(|part| {
            let (name, duration) = part.trim().split_once(";dur=")?;
            Some((name.trim().to_owned(), duration.trim().parse().ok()?))
        })
        .collect()
}

/// One request on a fresh connection; (client ms, Server-Timing phases).
async fn one_request(
    address: std::net::SocketAddr,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (f64, BTreeMap<String, f64>) {
    let started = Instant::now();
    let mut stream = BufReader::new(tokio::net::TcpStream::connect(address).await.expect("connect"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.get_mut().write_all(head.as_bytes()).await.expect("send head");
    stream.get_mut().write_all(body).await.expect("send body");
    let (status, headers, answer) = loadgen::read_response(&mut stream).await.expect("a response");
    let client_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&answer));
    (client_ms, server_timing(headers.get("server-timing").map(String::as_str).unwrap_or("")))
}

/// Table 2: the real server over loopback, one build after the other.
fn http(o: &Options, runtime: &tokio::runtime::Runtime) -> serde_json::Value {
    o.server_bins
        .iter()
        .map(|bin| json!({ "server_bin": bin.display().to_string(), "rows": http_one(o, bin, runtime) }))
        .collect()
}

fn http_one(o: &Options, server_bin: &Path, runtime: &tokio::runtime::Runtime) -> serde_json::Value {
    println!("\nover loopback: {}", server_bin.display());
    let args: Vec<String> = ["--device", "cpu", "--queue-depth", "4", "--model"]
        .map(String::from)
        .into_iter()
        .chain([o.model.display().to_string()])
        .collect();
    let mut server = ServerProcess::start(server_bin, &args, Path::new("."));
    let address = server.address;
    let mut rows = Vec::new();
    for &(width, height) in &o.sizes {
        let (left, right) = pair_at(width, height);
        let (content_type, body) = multipart(&[("left", &left), ("right", &right)]);
        let body = Arc::new(body);
        // Health, then one untimed request at this size (the profiling executor's first runs).
        let ready_by = Instant::now() + Duration::from_secs(300);
        while loadgen::http(address, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0 != 200 {
            assert!(Instant::now() < ready_by, "server not ready");
            std::thread::sleep(Duration::from_millis(300));
        }
        runtime.block_on(one_request(address, "/api/v1/disparity?format=pfm", &content_type, &body));
        for name in &o.formats {
            let path = format!("/api/v1/disparity?format={name}");
            let samples: Vec<_> =
                (0..o.requests).map(|_| runtime.block_on(one_request(address, &path, &content_type, &body))).collect();
            let phase =
                |key: &str| median(samples.iter().map(|(_, t)| t.get(key).copied().unwrap_or(f64::NAN)).collect());
            let client = median(samples.iter().map(|(c, _)| *c).collect());
            let around = median(samples.iter().map(|(c, t)| c - t.get("inference").copied().unwrap_or(0.0)).collect());
            let (decode, encode) = (phase("decode"), phase("encode"));
            println!(
                "http {width}x{height} {name:<6} decode {decode:6.2}  encode {encode:6.2}  decode+encode {:6.2}  inference {:8.1}  client {client:8.1}  client-inference {around:6.2} ms",
                decode + encode,
                phase("inference"),
            );
            rows.push(json!({
                "size": format!("{width}x{height}"), "format": name, "requests": o.requests,
                "decode_ms": decode, "encode_ms": encode, "decode_plus_encode_ms": decode + encode,
                "queue_ms": phase("queue"), "inference_ms": phase("inference"), "server_total_ms": phase("total"),
                "client_ms": client, "client_minus_inference_ms": around,
            }));
        }
    }
    let exit = server.terminate(Duration::from_secs(60));
    assert!(exit.success(), "server exit {exit}");
    json!(rows)
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let phases = o.phases.then(|| {
        let config = EngineConfig {
            model_path: o.model.clone(),
            device: DeviceChoice::Cpu,
            queue_depth: 1,
            threads: 0,
            memory_format: MemoryFormat::Auto,
            precision: Precision::Auto,
            warm_sizes: Vec::new(),
            cuda_graphs: 0,
            pinned_staging: true,
            cpu_buffer_pool: true,
            faults: None,
        };
        let engine = Engine::start(config).expect("engine thread");
        runtime.block_on(engine.wait_ready()).expect("model loads");
        phases(&o, &engine, &runtime)
    });
    let http = o.http.then(|| http(&o, &runtime));
    let result = json!({ "in_process": phases, "http": http });
    if let Some(path) = &o.json {
        std::fs::write(path, format!("{}\n", serde_json::to_string_pretty(&result).unwrap())).unwrap();
    }
}
