//! Stereo videos through the `ffmpeg` program: the stream's size, rate and
//! frame count from `ffprobe`, frames read one at a time as raw RGB from a
//! pipe (never the whole video in memory), and the colour disparity written
//! back as an H.264 video.
//!
//! The program is a run-time dependency (Debian's `ffmpeg` package, also in the
//! Docker image); when it is missing the error says so and names it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::decode::{split_packed, VideoLayout};

/// Where a stereo video's views are.
#[derive(Debug, Clone, PartialEq)]
pub enum VideoSource {
    /// One file, both views in each frame.
    Packed { path: PathBuf, layout: VideoLayout },
    /// One file per view, frames matched by number.
    Separate { left: PathBuf, right: PathBuf },
}

impl VideoSource {
    /// The input's description in messages and the summary.
    pub fn describe(&self) -> String {
        match self {
            VideoSource::Packed { path, layout } => format!("{} ({})", path.display(), layout.label()),
            VideoSource::Separate { left, right } => format!("{} + {}", left.display(), right.display()),
        }
    }
}

/// What `ffprobe` says about a video stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    pub width: u32,
    pub height: u32,
    /// Frames per second (the stream's average rate).
    pub fps: f64,
    /// Frames in the stream (packets counted, not guessed from the duration).
    pub frames: u64,
}

/// Which frames to take: `--start`, `--duration`, `--every`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FramePick {
    pub start_seconds: Option<f64>,
    pub duration_seconds: Option<f64>,
    pub every: u64,
}

impl FramePick {
    /// The frame numbers picked from a video with `info`, first to last.
    pub fn frames(&self, info: &VideoInfo) -> Vec<u64> {
        let first = self.start_seconds.map_or(0, |s| (s * info.fps).round() as u64).min(info.frames);
        let end = match self.duration_seconds {
            Some(d) => (first + (d * info.fps).round() as u64).min(info.frames),
            None => info.frames,
        };
        (first..end).step_by(self.every.max(1) as usize).collect()
    }
}

/// Why a video cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error(
        "the `{0}` program is needed for videos and was not found on PATH (Debian/Ubuntu: apt-get install ffmpeg)"
    )]
    ProgramMissing(&'static str),
    #[error("{path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("{0}")]
    Layout(String),
    #[error("writing the video: {0}")]
    Writing(String),
}

fn spawn_error(program: &'static str, e: std::io::Error) -> VideoError {
    if e.kind() == std::io::ErrorKind::NotFound {
        VideoError::ProgramMissing(program)
    } else {
        VideoError::Writing(format!("starting {program}: {e}"))
    }
}

/// Reads a stream's size, rate and frame count with `ffprobe`.
pub async fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    let unreadable = |message: String| VideoError::Unreadable { path: path.display().to_string(), message };
    let output = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries"])
        .arg("stream=width,height,avg_frame_rate,r_frame_rate,nb_read_packets")
        .args(["-of", "json"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| spawn_error("ffprobe", e))?;
    if !output.status.success() {
        return Err(unreadable(String::from_utf8_lossy(&output.stderr).trim().to_owned()));
    }
    parse_probe(&output.stdout).map_err(unreadable)
}

/// The fields of `ffprobe -of json` we use.
fn parse_probe(json: &[u8]) -> Result<VideoInfo, String> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("ffprobe's answer: {e}"))?;
    let stream = value["streams"].get(0).ok_or("no video stream")?;
    let number = |key: &str| stream[key].as_u64().or_else(|| stream[key].as_str().and_then(|s| s.parse().ok()));
    let rate = |key: &str| {
        let text = stream[key].as_str()?;
        let (n, d) = text.split_once('/').unwrap_or((text, "1"));
        let (n, d): (f64, f64) = (n.parse().ok()?, d.parse().ok()?);
        (n > 0.0 && d > 0.0).then(|| n / d)
    };
    let (width, height) = (number("width").ok_or("no frame size")?, number("height").ok_or("no frame size")?);
    let fps = rate("avg_frame_rate").or_else(|| rate("r_frame_rate")).ok_or("no frame rate")?;
    let frames = number("nb_read_packets").ok_or("no frame count")?;
    let size = |v: u64| u32::try_from(v).map_err(|_| format!("frame size {width}x{height}"));
    Ok(VideoInfo { width: size(width)?, height: size(height)?, fps, frames })
}

/// One view's frames as raw RGB, from frame `first` on.
struct FramePipe {
    child: Child,
    stdout: ChildStdout,
    frame_bytes: usize,
    path: PathBuf,
}

impl FramePipe {
    fn open(path: &Path, info: &VideoInfo, first: u64) -> Result<FramePipe, VideoError> {
        let mut command = Command::new("ffmpeg");
        command.args(["-v", "error", "-nostdin"]);
        if first > 0 {
            // An input seek decodes from the key frame before and drops frames up to the
            // time asked; half a frame early lands on frame `first` whatever the rounding.
            command.args(["-ss", &format!("{:.6}", (first as f64 - 0.5).max(0.0) / info.fps)]);
        }
        let mut child = command
            .arg("-i")
            .arg(path)
            .args(["-map", "0:v:0", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| spawn_error("ffmpeg", e))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let frame_bytes = info.width as usize * info.height as usize * 3;
        Ok(FramePipe { child, stdout, frame_bytes, path: path.to_owned() })
    }

    /// The next frame, or `None` at the end of the stream.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, VideoError> {
        let mut frame = vec![0u8; self.frame_bytes];
        let mut filled = 0;
        while filled < frame.len() {
            match self.stdout.read(&mut frame[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Err(self.failure(e.to_string()).await),
            }
        }
        match filled {
            0 => {
                let status = self.child.wait().await.map_err(|e| self.unreadable(e.to_string()))?;
                if status.success() {
                    Ok(None)
                } else {
                    Err(self.failure(format!("ffmpeg exited with {status}")).await)
                }
            }
            n if n < frame.len() => Err(self.failure(format!("the last frame stopped after {n} bytes")).await),
            _ => Ok(Some(frame)),
        }
    }

    fn unreadable(&self, message: String) -> VideoError {
        VideoError::Unreadable { path: self.path.display().to_string(), message }
    }

    /// An error with what ffmpeg said on stderr.
    async fn failure(&mut self, what: String) -> VideoError {
        let mut said = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut said).await;
        }
        let said = said.trim();
        self.unreadable(if said.is_empty() { what } else { format!("{what}: {said}") })
    }
}

/// A stereo video's frames as pairs of raw RGB views, in order.
pub struct StereoFrames {
    views: Views,
    /// Size of each view.
    pub width: u32,
    pub height: u32,
    /// Number of the next frame [`StereoFrames::next`] gives.
    pub next_frame: u64,
}

/// One pipe with both views packed (its layout and frame width), or one pipe per view.
struct Views {
    pipes: Vec<FramePipe>,
    packed: Option<(VideoLayout, u32)>,
}

/// The size of each view of a frame of `info` in `layout`.
pub fn view_size(info: &VideoInfo, layout: VideoLayout) -> Result<(u32, u32), VideoError> {
    layout.view_size(info.width, info.height).map_err(VideoError::Layout)
}

impl StereoFrames {
    /// Starts reading `source` (described by `info`, the left view's for two
    /// files) at frame `first`.
    pub fn open(source: &VideoSource, info: &VideoInfo, first: u64) -> Result<StereoFrames, VideoError> {
        let (views, (width, height)) = match source {
            VideoSource::Packed { path, layout } => {
                let size = view_size(info, *layout)?;
                let pipes = vec![FramePipe::open(path, info, first)?];
                (Views { pipes, packed: Some((*layout, info.width)) }, size)
            }
            VideoSource::Separate { left, right } => {
                let pipes = vec![FramePipe::open(left, info, first)?, FramePipe::open(right, info, first)?];
                let views = Views { pipes, packed: None };
                (views, (info.width, info.height))
            }
        };
        Ok(StereoFrames { views, width, height, next_frame: first })
    }

    /// The next frame's views (RGB, `width * height * 3` bytes each), or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<(Bytes, Bytes)>, VideoError> {
        let views = match self.views.packed {
            Some((layout, frame_width)) => {
                let Some(frame) = self.views.pipes[0].next().await? else { return Ok(None) };
                Some(split_packed(&frame, frame_width, layout))
            }
            None => match (self.views.pipes[0].next().await?, self.views.pipes[1].next().await?) {
                (Some(l), Some(r)) => Some((Bytes::from(l), Bytes::from(r))),
                _ => None,
            },
        };
        self.next_frame += u64::from(views.is_some());
        Ok(views)
    }
}

/// Frames in, an H.264 video out (through ffmpeg), written under a temporary
/// name and moved into place by [`VideoWriter::finish`].
pub struct VideoWriter {
    child: Child,
    stdin: ChildStdin,
    partial: PathBuf,
    path: PathBuf,
    size: (u32, u32),
}

impl VideoWriter {
    pub fn create(path: &Path, width: u32, height: u32, fps: f64) -> Result<VideoWriter, VideoError> {
        let partial = super::output::partial_name(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| VideoError::Writing(format!("{}: {e}", dir.display())))?;
        }
        let mut child = Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
            .args(["-s", &format!("{width}x{height}"), "-framerate", &format!("{fps}"), "-i", "-"])
            // yuv420p (what players expect) needs even sides: pad by one black line if not.
            .args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p"])
            .args(["-movflags", "+faststart", "-f", "mp4"])
            .arg(&partial)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| spawn_error("ffmpeg", e))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        Ok(VideoWriter { child, stdin, partial, path: path.to_owned(), size: (width, height) })
    }

    /// Where the finished video goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of one RGB frame of the video.
    pub fn frame_len(&self) -> usize {
        self.size.0 as usize * self.size.1 as usize * 3
    }

    /// Appends one RGB frame of the video's size.
    pub async fn push(&mut self, rgb: &[u8]) -> Result<(), VideoError> {
        let (w, h) = self.size;
        if rgb.len() != self.frame_len() {
            return Err(VideoError::Writing(format!("a frame of {} bytes in a {w}x{h} video", rgb.len())));
        }
        self.stdin.write_all(rgb).await.map_err(|e| VideoError::Writing(e.to_string()))
    }

    /// Ends the stream and moves the finished file into place.
    pub async fn finish(self) -> Result<PathBuf, VideoError> {
        let VideoWriter { child, stdin, partial, path, .. } = self;
        drop(stdin);
        let output = child.wait_with_output().await.map_err(|e| VideoError::Writing(e.to_string()))?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&partial);
            return Err(VideoError::Writing(String::from_utf8_lossy(&output.stderr).trim().to_owned()));
        }
        std::fs::rename(&partial, &path).map_err(|e| VideoError::Writing(format!("{}: {e}", path.display())))?;
        Ok(path)
    }

    /// Stops without a finished file (the partial one is removed).
    pub async fn abandon(self) {
        let VideoWriter { mut child, partial, .. } = self;
        let _ = child.kill().await;
        let _ = std::fs::remove_file(partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_are_read() {
        let json = br#"{"streams": [{"width": 640, "height": 240, "r_frame_rate": "30/1",
            "avg_frame_rate": "30000/1001", "nb_read_packets": "120"}]}"#;
        let info = parse_probe(json).unwrap();
        assert_eq!((info.width, info.height, info.frames), (640, 240, 120));
        assert!((info.fps - 29.97).abs() < 0.01);
        assert!(parse_probe(br#"{"streams": []}"#).is_err());
        let no_rate = br#"{"streams": [{"width": 2, "height": 2, "avg_frame_rate": "0/0", "nb_read_packets": "1"}]}"#;
        assert_eq!(parse_probe(no_rate).unwrap_err(), "no frame rate");
    }

    #[test]
    fn frames_are_picked_by_time_and_step() {
        let info = VideoInfo { width: 4, height: 2, fps: 10.0, frames: 100 };
        let pick = |start, duration, every| FramePick { start_seconds: start, duration_seconds: duration, every };
        assert_eq!(pick(None, None, 1).frames(&info).len(), 100);
        assert_eq!(pick(Some(1.0), Some(0.5), 1).frames(&info), [10, 11, 12, 13, 14]);
        assert_eq!(pick(Some(9.5), None, 2).frames(&info), [95, 97, 99]);
        assert_eq!(pick(Some(20.0), None, 1).frames(&info), Vec::<u64>::new(), "past the end: nothing");
    }

    #[test]
    fn packed_frames_split_into_views() {
        // 4x2 frame, pixel value = column * 10 + row.
        let frame: Vec<u8> = (0..2u8).flat_map(|y| (0..4u8).flat_map(move |x| [x * 10 + y; 3])).collect();
        let (left, right) = split_packed(&frame, 4, VideoLayout::Sbs);
        assert_eq!(left.iter().step_by(3).copied().collect::<Vec<_>>(), [0, 10, 1, 11]);
        assert_eq!(right.iter().step_by(3).copied().collect::<Vec<_>>(), [20, 30, 21, 31]);
        let (top, bottom) = split_packed(&frame, 4, VideoLayout::Tb);
        assert_eq!(top.iter().step_by(3).copied().collect::<Vec<_>>(), [0, 10, 20, 30]);
        assert_eq!(bottom.iter().step_by(3).copied().collect::<Vec<_>>(), [1, 11, 21, 31]);
        let info = VideoInfo { width: 5, height: 2, fps: 1.0, frames: 1 };
        assert!(view_size(&info, VideoLayout::Sbs).is_err());
        assert_eq!(view_size(&info, VideoLayout::Tb).unwrap(), (5, 1));
    }
}
