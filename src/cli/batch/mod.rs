//! `stereo-recon batch`: whole datasets and stereo videos through one loaded
//! engine, on the one pipeline.
//!
//! ```text
//! feeder task ──(item, running pipeline)──▶ bounded queue ──▶ writer (this task)
//!  reads files / video frames,               in input order     writes files whole,
//!  starts pipeline runs (decode on            at most            reports progress,
//!  the CPU pool, then the engine)             --pipeline-depth   feeds --video-out
//! ```
//!
//! A semaphore of `--pipeline-depth` permits bounds the pairs in flight, from
//! reading to written: the next pairs decode while the engine computes one and
//! the finished ones are encoded and written, so the engine rarely waits, and
//! memory stays flat however long the video. Everything that can be decided
//! before the model loads is ([`plan`]): a run with nothing left to do never
//! loads it.

mod output;
mod plan;
mod report;
mod video;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::BatchArgs;
use crate::dataset::DatasetPair;
use crate::pipeline::{EncodedAnswer, Options, Outcome, OutputFormat, PairInput, Pipeline, PipelineError, Request};
use plan::{InputSource, Item, ItemSource, Plan};
use report::{Report, Summary};
use video::{StereoFrames, VideoWriter};

/// One pair on its way from the feeder to the writer, in input order.
enum Entry {
    /// Its files exist already (a resumed run).
    Existing(usize),
    /// Running through the pipeline; the permit frees its place when written.
    Running(usize, JoinHandle<Result<Outcome, String>>, OwnedSemaphorePermit),
    /// Could not even be started (unreadable file, missing calibration, video ended).
    Failed(usize, String),
}

/// Runs the command; `Err` (a non-zero exit) when a pair failed or the run was stopped.
pub async fn run(args: BatchArgs) -> Result<String, String> {
    let plan = Arc::new(plan::plan(&args).await?);
    let settings = &plan.settings;
    let needs: Arc<Vec<bool>> = Arc::new(
        plan.items
            .iter()
            .map(|item| {
                settings.overwrite || !output::is_done(&plan.inputs[item.input].out_dir, &settings.formats, &item.name)
            })
            .collect(),
    );
    if args.dry_run {
        return Ok(report::listing(&plan, &needs, args.json));
    }
    let pipeline = if needs.iter().any(|n| *n) {
        Some(super::start_pipeline(&args.model, settings.pipeline_depth).await?)
    } else {
        None
    };
    let model = match &pipeline {
        Some(p) => p.engine.wait_ready().await.ok(),
        None => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    tokio::spawn(stop_on_signal(stop.clone()));
    let (entries, mut received) = mpsc::channel(settings.pipeline_depth);
    let feeder = Feeder {
        plan: plan.clone(),
        needs: needs.clone(),
        pipeline,
        entries,
        stop: stop.clone(),
        permits: Arc::new(Semaphore::new(settings.pipeline_depth)),
    };
    let feeding = tokio::spawn(feeder.run());

    let mut report = Report::new(plan.items.len() as u64, args.json);
    let mut video = start_video(&plan, &needs)?;
    let mut seen = 0;
    while let Some(entry) = received.recv().await {
        seen += 1;
        let frame = write_entry(&plan, entry, &mut report).await;
        if settings.fail_fast && !report.failures.is_empty() {
            stop.store(true, Ordering::SeqCst);
        }
        if let Some(writer) = &mut video {
            let rgb = match frame {
                Some(rgb) => rgb,
                None => vec![0; writer.frame_len()],
            };
            if let Err(e) = writer.push(&rgb).await {
                report.video_failed(writer.path(), e.to_string());
                video.take().expect("a writer").abandon().await;
            }
        }
    }
    let _ = feeding.await;
    report.finish_display();

    let interrupted = seen < plan.items.len();
    let video_path = match video {
        Some(writer) if !interrupted => Some(writer.finish().await.map_err(|e| e.to_string())?),
        Some(writer) => {
            writer.abandon().await;
            None
        }
        None => None,
    };
    let summary_path = Summary::path(&args.out, &plan);
    let summary = Summary::new(&plan, &report, model.as_deref(), &args.out, interrupted, video_path.as_deref());
    let json = serde_json::to_vec_pretty(&summary).expect("the summary serialises");
    output::write_whole(&summary_path, &json).map_err(|e| format!("{}: {e}", summary_path.display()))?;
    let succeeded = report.failures.is_empty() && !interrupted;
    if args.json {
        // Scripts read the summary as the last line on stdout, whatever the exit status.
        let line = serde_json::to_string(&serde_json::json!({ "summary": summary })).expect("the summary serialises");
        if succeeded {
            return Ok(line);
        }
        println!("{line}");
        return Err(format!(
            "{} pair(s) failed{}",
            report.failures.len(),
            if interrupted { ", stopped early" } else { "" }
        ));
    }
    let text = summary.text(&summary_path);
    if succeeded {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Ctrl-C or SIGTERM (a Kubernetes pod stopping): finish the pairs in flight,
/// write the summary, exit. A second signal exits at once.
async fn stop_on_signal(stop: Arc<AtomicBool>) {
    super::shutdown_signal().await;
    stop.store(true, Ordering::SeqCst);
    eprintln!("stopping: finishing the pairs in flight (again to quit at once)");
    super::shutdown_signal().await;
    std::process::exit(130);
}

/// The colour-disparity video, when asked and not already complete.
fn start_video(plan: &Plan, needs: &[bool]) -> Result<Option<VideoWriter>, String> {
    let Some(path) = &plan.settings.video_out else { return Ok(None) };
    if path.is_file() && !needs.iter().any(|n| *n) && !plan.settings.overwrite {
        return Ok(None);
    }
    let Some(InputSource::Video { source, info }) = plan.inputs.first().map(|i| &i.source) else {
        return Ok(None);
    };
    let (width, height) = match source {
        video::VideoSource::Packed { layout, .. } => video::view_size(info, *layout).map_err(|e| e.to_string())?,
        video::VideoSource::Separate { .. } => (info.width, info.height),
    };
    let (width, height) = match plan.settings.scale.filter(|&s| s < 1.0) {
        Some(scale) => crate::pipeline::scaled_size(width, height, scale),
        None => (width, height),
    };
    let fps = info.fps / plan.settings.pick.every as f64;
    VideoWriter::create(path, width, height, fps).map(Some).map_err(|e| e.to_string())
}

/// Takes one entry to its end: files written and reported. Returns the
/// pair's colour image as RGB when the video needs it.
async fn write_entry(plan: &Plan, entry: Entry, report: &mut Report) -> Option<Vec<u8>> {
    let want_frame = plan.settings.video_out.is_some();
    match entry {
        Entry::Existing(i) => {
            let (item, input) = (&plan.items[i], &plan.inputs[plan.items[i].input]);
            report.pair_skipped(item, &input.label);
            if !want_frame {
                return None;
            }
            let path = output::output_path(&input.out_dir, OutputFormat::Color, &item.name);
            let bytes = tokio::fs::read(&path).await.ok()?;
            rgb_of_png(bytes).await
        }
        Entry::Failed(i, reason) => {
            let (item, input) = (&plan.items[i], &plan.inputs[plan.items[i].input]);
            report.pair_failed(item, &input.label, reason);
            None
        }
        Entry::Running(i, running, permit) => {
            let (item, input) = (&plan.items[i], &plan.inputs[plan.items[i].input]);
            report.work_started();
            let outcome = running.await.unwrap_or_else(|e| Err(format!("internal error: {e}")));
            let written = match outcome {
                Ok(outcome) => write_outcome(plan, item, outcome).await,
                Err(reason) => Err(reason),
            };
            drop(permit);
            match written {
                Ok((files, timings, colour)) => {
                    report.pair_done(item, &input.label, &files, &timings);
                    match (want_frame, colour) {
                        (true, Some(png)) => rgb_of_png(png).await,
                        _ => None,
                    }
                }
                Err(reason) => {
                    report.pair_failed(item, &input.label, reason);
                    None
                }
            }
        }
    }
}

/// Writes every answer of `outcome` to its file; returns the files, the
/// timings and the colour PNG (for the video).
async fn write_outcome(
    plan: &Plan,
    item: &Item,
    outcome: Outcome,
) -> Result<(Vec<std::path::PathBuf>, crate::pipeline::Timings, Option<Vec<u8>>), String> {
    let dir = plan.inputs[item.input].out_dir.clone();
    let name = item.name.clone();
    let timings = outcome.timings;
    let answers: Vec<(OutputFormat, Vec<u8>)> = outcome
        .answers
        .into_iter()
        .map(|(format, answer)| match answer.body {
            EncodedAnswer::File { bytes, .. } | EncodedAnswer::Document(bytes) => (format, bytes),
            EncodedAnswer::Json { .. } => unreachable!("the pipeline finishes JSON answers"),
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut files = Vec::with_capacity(answers.len());
        let mut colour = None;
        for (format, bytes) in answers {
            let path = output::output_path(&dir, format, &name);
            output::write_whole(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            files.push(path);
            if format == OutputFormat::Color {
                colour = Some(bytes);
            }
        }
        Ok((files, timings, colour))
    })
    .await
    .map_err(|e| format!("internal error: {e}"))?
}

async fn rgb_of_png(png: Vec<u8>) -> Option<Vec<u8>> {
    crate::pipeline::pool::run(move || image::load_from_memory(&png).ok().map(|i| i.to_rgb8().into_raw()))
        .await
        .ok()
        .flatten()
}

/// See [`Feeder::next_step`].
enum Step {
    Stop,
    Passed,
    Compute,
}

/// Reads the inputs in order and starts each pair that needs computing.
struct Feeder {
    plan: Arc<Plan>,
    needs: Arc<Vec<bool>>,
    pipeline: Option<Pipeline>,
    entries: mpsc::Sender<Entry>,
    stop: Arc<AtomicBool>,
    permits: Arc<Semaphore>,
}

impl Feeder {
    async fn run(self) {
        let items = &self.plan.items;
        let mut start = 0;
        while start < items.len() {
            let input = items[start].input;
            let end = start + items[start..].iter().take_while(|i| i.input == input).count();
            let went_on = match &self.plan.inputs[input].source {
                InputSource::Dataset => self.feed_files(start..end).await,
                InputSource::Video { source, info } => self.feed_video(start..end, source, info).await,
            };
            if !went_on {
                return;
            }
            start = end;
        }
    }

    /// Sends `entry`; false when the run is over (stopped, or the writer gone).
    async fn send(&self, entry: Entry) -> bool {
        self.entries.send(entry).await.is_ok()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// A place in flight, unless the run was stopped meanwhile.
    async fn place(&self) -> Option<OwnedSemaphorePermit> {
        if self.stopped() {
            return None;
        }
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        (!self.stopped()).then_some(permit)
    }

    /// What to do with item `i`: nothing more (the run is stopped), pass it
    /// on as done (its files exist), or compute it.
    async fn next_step(&self, i: usize) -> Step {
        if self.stopped() {
            return Step::Stop;
        }
        if self.needs[i] {
            Step::Compute
        } else if self.send(Entry::Existing(i)).await {
            Step::Passed
        } else {
            Step::Stop
        }
    }

    async fn feed_files(&self, range: std::ops::Range<usize>) -> bool {
        for i in range {
            match self.next_step(i).await {
                Step::Stop => return false,
                Step::Passed => continue,
                Step::Compute => {}
            }
            let ItemSource::Files(pair) = &self.plan.items[i].what else { unreachable!("a dataset lists files") };
            let Some(permit) = self.place().await else { return false };
            let entry = match self.files_request(pair).await {
                Ok(request) => Entry::Running(i, self.start(request, Some(pair)), permit),
                Err(reason) => Entry::Failed(i, reason),
            };
            if !self.send(entry).await {
                return false;
            }
        }
        true
    }

    async fn feed_video(
        &self,
        range: std::ops::Range<usize>,
        source: &video::VideoSource,
        info: &video::VideoInfo,
    ) -> bool {
        let frame_of = |i: usize| match self.plan.items[i].what {
            ItemSource::Frame(n) => n,
            ItemSource::Files(_) => unreachable!("a video lists frames"),
        };
        let first_needed = range.clone().find(|&i| self.needs[i]);
        let mut frames = match first_needed.map(|i| StereoFrames::open(source, info, frame_of(i))) {
            Some(Ok(frames)) => Some(frames),
            Some(Err(e)) => {
                // Nothing of this video can be read: every pair it should give fails.
                let reason = e.to_string();
                for i in range.clone().filter(|&i| self.needs[i]) {
                    if !self.send(Entry::Failed(i, reason.clone())).await {
                        return false;
                    }
                }
                return true;
            }
            None => None,
        };
        for i in range {
            match self.next_step(i).await {
                Step::Stop => return false,
                Step::Passed => continue,
                Step::Compute => {}
            }
            let Some(permit) = self.place().await else { return false };
            let entry = match read_frame(&mut frames, frame_of(i)).await {
                Ok((left, right, (width, height))) => {
                    let pair = PairInput::Pixels { width, height, left, right };
                    Entry::Running(i, self.start(self.request(pair, None), None), permit)
                }
                Err(reason) => Entry::Failed(i, reason),
            };
            if !self.send(entry).await {
                return false;
            }
        }
        true
    }

    /// A pair's request: its images read, its calibration found when a format needs one.
    async fn files_request(&self, pair: &DatasetPair) -> Result<Request, String> {
        let read = |path: std::path::PathBuf| async move {
            tokio::fs::read(&path).await.map(Bytes::from).map_err(|e| format!("{}: {e}", path.display()))
        };
        let (left, right) = (read(pair.left.clone()).await?, read(pair.right.clone()).await?);
        let calibration =
            match (&self.plan.settings.calibration, self.plan.settings.formats.iter().any(|f| f.needs_calibration())) {
                (Some((_, calibration, format)), _) => Some((calibration.clone(), *format)),
                (None, false) => None,
                (None, true) => match &pair.calibration {
                    Some(path) => Some(super::read_calibration(path)?),
                    None => {
                        return Err(format!(
                            "depth and points need a calibration and {} has none beside it: give --calib FILE",
                            pair.left.display()
                        ))
                    }
                },
            };
        Ok(self.request(PairInput::Files { left, right }, calibration))
    }

    fn request(
        &self,
        pair: PairInput,
        calibration: Option<(crate::calibration::Calibration, crate::calibration::CalibrationFormat)>,
    ) -> Request {
        let s = &self.plan.settings;
        let calibration = calibration.or_else(|| s.calibration.as_ref().map(|(_, c, f)| (c.clone(), *f)));
        let options = Options {
            formats: s.formats.clone(),
            max_depth: s.max_depth,
            max_uncertainty: s.max_uncertainty,
            scale: s.scale,
            ..Options::default()
        };
        Request { pair, ground_truth: None, calibration, options, started: Instant::now(), receiving: None }
    }

    /// Starts `request` through the pipeline; errors about an image name its file.
    fn start(&self, request: Request, pair: Option<&DatasetPair>) -> JoinHandle<Result<Outcome, String>> {
        let pipeline = self.pipeline.clone().expect("the engine runs when a pair needs computing");
        let files = pair.map(|p| (p.left.clone(), p.right.clone()));
        tokio::spawn(async move {
            pipeline.run(request).await.map_err(|e| match (e, &files) {
                (PipelineError::Image { field, source }, Some((left, right))) => {
                    let path = if field == "left" { left } else { right };
                    format!("{}: {source}", path.display())
                }
                (e, _) => e.to_string(),
            })
        })
    }
}

/// Reads on to frame `number` (frames before it are passed over).
async fn read_frame(frames: &mut Option<StereoFrames>, number: u64) -> Result<(Bytes, Bytes, (u32, u32)), String> {
    let reader = frames.as_mut().ok_or_else(|| "the video could not be read this far".to_owned())?;
    loop {
        let at = reader.next_frame;
        match reader.next().await {
            Ok(Some((left, right))) if at == number => return Ok((left, right, (reader.width, reader.height))),
            Ok(Some(_)) => continue,
            Ok(None) => {
                *frames = None;
                return Err(format!("the video ended at frame {at}, before this one"));
            }
            Err(e) => {
                *frames = None;
                return Err(e.to_string());
            }
        }
    }
}
