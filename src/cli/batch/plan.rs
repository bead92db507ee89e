//! What a `batch` run will do, worked out before the model loads: the options
//! checked, each input recognised (dataset folder or stereo video), every pair
//! listed in a fixed order and the shard's slice of them taken.

use std::path::{Path, PathBuf};

use super::video::{self, FramePick, VideoInfo, VideoSource};
use crate::calibration::{Calibration, CalibrationFormat};
use crate::config::{BatchArgs, Shard};
use crate::dataset::{self, DatasetPair};
use crate::pipeline::OutputFormat;

/// The run's settings, checked.
pub struct Settings {
    pub formats: Vec<OutputFormat>,
    /// `--calib`, read and parsed once, with its file.
    pub calibration: Option<(PathBuf, Calibration, CalibrationFormat)>,
    pub max_depth: Option<f64>,
    pub max_uncertainty: Option<f32>,
    pub scale: Option<f32>,
    pub overwrite: bool,
    pub fail_fast: bool,
    pub shard: Shard,
    pub pipeline_depth: usize,
    pub video_out: Option<PathBuf>,
    pub pick: FramePick,
}

/// One input and where its outputs go.
pub struct Input {
    /// The input as given (a folder, a video, or two videos).
    pub label: String,
    pub out_dir: PathBuf,
    pub source: InputSource,
}

pub enum InputSource {
    Dataset,
    Video { source: VideoSource, info: VideoInfo },
}

/// One pair to process.
#[derive(Debug, Clone)]
pub struct Item {
    /// Index of the input it comes from.
    pub input: usize,
    /// The name its files get.
    pub name: String,
    pub what: ItemSource,
}

#[derive(Debug, Clone)]
pub enum ItemSource {
    Files(Box<DatasetPair>),
    /// A frame of the input's video, by number from the start.
    Frame(u64),
}

/// Everything a run needs before the engine starts.
pub struct Plan {
    pub settings: Settings,
    pub inputs: Vec<Input>,
    /// This shard's pairs, in input order.
    pub items: Vec<Item>,
    /// All pairs of every shard.
    pub total_pairs: u64,
}

/// Parses and checks the options and lists the pairs.
pub async fn plan(args: &BatchArgs) -> Result<Plan, String> {
    let settings = settings(args)?;
    let mut inputs = Vec::new();
    let mut all = Vec::new();
    let given = args.inputs.len() + usize::from(args.left_video.is_some());
    if given == 0 {
        return Err("no input: give dataset folders or videos (or --left-video and --right-video)".into());
    }
    let mut names = std::collections::BTreeSet::new();
    let mut add = |label: String, name: String, source: InputSource, items: Vec<(String, ItemSource)>| {
        if !names.insert(name.clone()) {
            return Err(format!("two inputs are named {name:?}: their outputs would mix; rename one"));
        }
        let out_dir = if given == 1 { args.out.clone() } else { args.out.join(&name) };
        let index = inputs.len();
        all.extend(items.into_iter().map(|(name, what)| Item { input: index, name, what }));
        inputs.push(Input { label, out_dir, source });
        Ok(())
    };
    for path in &args.inputs {
        let name = input_name(path);
        if path.is_dir() {
            let pairs = dataset::discover(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if pairs.is_empty() {
                return Err(format!(
                    "{}: no stereo pairs found (see `stereo-recon batch --help` for the layouts)",
                    path.display()
                ));
            }
            let items = pairs.into_iter().map(|p| (p.name.clone(), ItemSource::Files(Box::new(p)))).collect();
            add(path.display().to_string(), name, InputSource::Dataset, items)?;
        } else if path.is_file() {
            let Some(layout) = args.layout else {
                return Err(format!(
                    "{}: a file is read as a stereo video, which needs --layout sbs|tb (two files: --left-video, --right-video)",
                    path.display()
                ));
            };
            let source = VideoSource::Packed { path: path.clone(), layout };
            let info = video::probe(path).await.map_err(|e| e.to_string())?;
            video::view_size(&info, layout).map_err(|e| format!("{}: {e}", path.display()))?;
            add(source.describe(), name, InputSource::Video { source, info }, frame_items(&settings.pick, &info))?;
        } else {
            return Err(format!("{}: no such file or folder", path.display()));
        }
    }
    if let (Some(left), Some(right)) = (&args.left_video, &args.right_video) {
        let (left_info, right_info) = (
            video::probe(left).await.map_err(|e| e.to_string())?,
            video::probe(right).await.map_err(|e| e.to_string())?,
        );
        if (left_info.width, left_info.height) != (right_info.width, right_info.height) {
            return Err(format!(
                "{} is {}x{} but {} is {}x{}: the two views must have one size",
                left.display(),
                left_info.width,
                left_info.height,
                right.display(),
                right_info.width,
                right_info.height
            ));
        }
        let info = VideoInfo { frames: left_info.frames.min(right_info.frames), ..left_info };
        let source = VideoSource::Separate { left: left.clone(), right: right.clone() };
        add(
            source.describe(),
            input_name(left),
            InputSource::Video { source, info },
            frame_items(&settings.pick, &info),
        )?;
    }
    check_video_out(&settings, &inputs)?;
    let total_pairs = all.len() as u64;
    let items = all.into_iter().enumerate().filter(|(k, _)| settings.shard.takes(*k as u64)).map(|(_, i)| i).collect();
    Ok(Plan { settings, inputs, items, total_pairs })
}

/// An input's name in the output folder: the folder's or the video's file stem.
fn input_name(path: &Path) -> String {
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "input".into())
}

fn frame_items(pick: &FramePick, info: &VideoInfo) -> Vec<(String, ItemSource)> {
    pick.frames(info).into_iter().map(|n| (format!("frame_{n:06}"), ItemSource::Frame(n))).collect()
}

fn settings(args: &BatchArgs) -> Result<Settings, String> {
    let mut formats = Vec::new();
    for label in args.formats.iter().map(|f| f.trim()).filter(|f| !f.is_empty()) {
        let format = OutputFormat::from_label(label)
            .ok_or_else(|| format!("--formats: unknown format {label:?} (one of {})", OutputFormat::choices()))?;
        if !formats.contains(&format) {
            formats.push(format);
        }
    }
    // The video is made of the colour images, which are kept too (so a resumed run can rebuild it).
    if args.video_out.is_some() && !formats.contains(&OutputFormat::Color) {
        formats.push(OutputFormat::Color);
    }
    if formats.is_empty() {
        return Err("--formats: name at least one format".into());
    }
    super::super::check_limits(args.max_depth, args.max_uncertainty)?;
    if let Some(problem) = args.scale.and_then(crate::pipeline::scale_problem) {
        return Err(format!("--{}", problem.replacen('=', " ", 1)));
    }
    if args.every == 0 {
        return Err("--every must be at least 1".into());
    }
    for (flag, value) in [("--start", args.start), ("--duration", args.duration)] {
        if value.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            return Err(format!("{flag} must be a number of seconds, 0 or more"));
        }
    }
    let calibration = match &args.calib {
        Some(path) => {
            let (calibration, format) = super::super::read_calibration(path)?;
            Some((path.clone(), calibration, format))
        }
        None => None,
    };
    Ok(Settings {
        formats,
        calibration,
        max_depth: args.max_depth,
        max_uncertainty: args.max_uncertainty,
        scale: args.scale,
        overwrite: args.overwrite,
        fail_fast: args.fail_fast,
        shard: args.shard,
        pipeline_depth: args.pipeline_depth as usize,
        video_out: args.video_out.clone(),
        pick: FramePick { start_seconds: args.start, duration_seconds: args.duration, every: args.every },
    })
}

/// `--video-out` needs exactly one video and every one of its frames.
fn check_video_out(settings: &Settings, inputs: &[Input]) -> Result<(), String> {
    if settings.video_out.is_none() {
        return Ok(());
    }
    let videos = inputs.iter().filter(|i| matches!(i.source, InputSource::Video { .. })).count();
    if videos != 1 || inputs.len() != 1 {
        return Err("--video-out makes one video from one stereo video: give exactly one video input".into());
    }
    if settings.shard.count > 1 {
        return Err("--video-out needs every frame, so it cannot be used with --shard".into());
    }
    Ok(())
}
