//! What a `batch` run tells its user: a progress bar on a terminal (pairs
//! done, pairs/s, time left, failures), one JSON line per pair with `--json`,
//! nothing per pair otherwise; and at the end `summary.json` with the counts,
//! every failure and its reason, the throughput, the engine and the options.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::plan::{Item, Plan};
use crate::engine::ModelInfo;
use crate::pipeline::Timings;

/// How each pair is reported as it finishes.
enum Display {
    Bar(ProgressBar),
    JsonLines,
    Quiet,
}

/// What happened to one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PairStatus {
    /// Computed and written.
    Done,
    /// Its files were already there (a resumed run).
    Skipped,
    Failed,
}

/// One pair's line with `--json`.
#[derive(Serialize)]
struct PairLine<'a> {
    pair: &'a str,
    input: &'a str,
    status: PairStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    files: &'a [PathBuf],
    #[serde(skip_serializing_if = "Option::is_none")]
    timings_ms: Option<&'a Timings>,
}

/// A pair that failed, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub pair: String,
    pub input: String,
    pub reason: String,
}

/// The tallies of a run, and its display.
pub struct Report {
    display: Display,
    started: Instant,
    pub done: u64,
    pub skipped: u64,
    pub failures: Vec<Failure>,
    /// The engine's time summed over the pairs done, and when its first
    /// and last pair of work began and ended: the busy fraction.
    inference_ms: f64,
    first_submitted: Option<Instant>,
    last_finished: Option<Instant>,
}

impl Report {
    /// A report for `pairs` pairs; a bar only when stderr is a terminal.
    pub fn new(pairs: u64, json: bool) -> Report {
        let display = if json {
            Display::JsonLines
        } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = ProgressBar::with_draw_target(Some(pairs), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} pairs  {per_sec}  ETA {eta}  {msg}")
                    .expect("the template is valid");
            bar.set_style(style.progress_chars("=> "));
            Display::Bar(bar)
        } else {
            Display::Quiet
        };
        Report {
            display,
            started: Instant::now(),
            done: 0,
            skipped: 0,
            failures: Vec::new(),
            inference_ms: 0.0,
            first_submitted: None,
            last_finished: None,
        }
    }

    /// Marks the moment the engine was first given work.
    pub fn work_started(&mut self) {
        self.first_submitted.get_or_insert_with(Instant::now);
    }

    pub fn pair_done(&mut self, item: &Item, input: &str, files: &[PathBuf], timings: &Timings) {
        self.done += 1;
        self.inference_ms += timings.inference_ms;
        self.last_finished = Some(Instant::now());
        self.show(&item.name, input, PairStatus::Done, None, files, Some(timings));
    }

    pub fn pair_skipped(&mut self, item: &Item, input: &str) {
        self.skipped += 1;
        self.show(&item.name, input, PairStatus::Skipped, None, &[], None);
    }

    pub fn pair_failed(&mut self, item: &Item, input: &str, reason: String) {
        self.show(&item.name, input, PairStatus::Failed, Some(&reason), &[], None);
        self.add_failure(item.name.clone(), input, reason);
    }

    /// A failure that is no pair's: the colour video could not be written.
    pub fn video_failed(&mut self, path: &Path, reason: String) {
        let name = path.display().to_string();
        if let Display::Bar(bar) = &self.display {
            bar.println(format!("failed: {name}: {reason}"));
        }
        self.add_failure(name.clone(), &name, reason);
    }

    fn add_failure(&mut self, pair: String, input: &str, reason: String) {
        self.failures.push(Failure { pair, input: input.to_owned(), reason });
        if let Display::Bar(bar) = &self.display {
            bar.set_message(format!("{} failed", self.failures.len()));
        }
    }

    fn show(
        &self,
        name: &str,
        input: &str,
        status: PairStatus,
        reason: Option<&str>,
        files: &[PathBuf],
        timings: Option<&Timings>,
    ) {
        match &self.display {
            Display::Bar(bar) => {
                if let Some(reason) = reason {
                    bar.println(format!("failed: {name}: {reason}"));
                }
                bar.inc(1);
            }
            Display::JsonLines => {
                let line = PairLine { pair: name, input, status, reason, files, timings_ms: timings };
                println!("{}", serde_json::to_string(&line).expect("a pair line serialises"));
            }
            Display::Quiet => {}
        }
    }

    /// The share of the time from the first pair given to the engine to the
    /// last one finished that the engine spent computing.
    pub fn engine_busy(&self) -> Option<f64> {
        let span = self.last_finished?.duration_since(self.first_submitted?).as_secs_f64();
        (span > 0.0).then(|| (self.inference_ms / 1000.0 / span).min(1.0))
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn finish_display(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish();
        }
    }
}

/// `--dry-run`: the pairs this run would take, one a line (JSON with `--json`).
pub fn listing(plan: &Plan, needs: &[bool], json: bool) -> String {
    let lines = plan.items.iter().zip(needs).map(|(item, &needed)| {
        let input = plan.inputs[item.input].label.as_str();
        let status = if needed { "todo" } else { "done" };
        if json {
            serde_json::json!({ "pair": item.name, "input": input, "status": status }).to_string()
        } else {
            format!("{status}\t{input}\t{}", item.name)
        }
    });
    let mut text = lines.collect::<Vec<_>>().join("\n");
    if !json {
        let todo = needs.iter().filter(|n| **n).count();
        text.push_str(&format!(
            "\n{} pair(s) in shard {} ({} in all), {todo} to compute",
            plan.items.len(),
            plan.settings.shard,
            plan.total_pairs
        ));
    }
    text
}

/// `summary.json`, as written at the end of every run (interrupted or not).
#[derive(Serialize)]
pub struct Summary<'a> {
    /// Pairs in this shard.
    pub pairs: u64,
    /// Pairs of all shards together.
    pub pairs_all_shards: u64,
    pub shard: String,
    pub done: u64,
    pub skipped_existing: u64,
    pub failed: usize,
    pub failures: &'a [Failure],
    /// Stopped by Ctrl-C (or --fail-fast) before every pair was tried.
    pub interrupted: bool,
    pub seconds: f64,
    /// Pairs computed per second of the whole run.
    pub pairs_per_second: f64,
    /// Share of the engine's active span spent computing (1.0: never waiting for input).
    pub engine_busy: Option<f64>,
    pub device: Option<&'a str>,
    pub model: Option<&'a str>,
    pub precision: Option<&'a str>,
    pub inputs: Vec<&'a str>,
    pub out: &'a Path,
    pub video_out: Option<&'a Path>,
    pub options: serde_json::Value,
}

impl<'a> Summary<'a> {
    pub fn new(
        plan: &'a Plan,
        report: &'a Report,
        model: Option<&'a ModelInfo>,
        out: &'a Path,
        interrupted: bool,
        video_out: Option<&'a Path>,
    ) -> Summary<'a> {
        let s = &plan.settings;
        let seconds = (report.seconds() * 1000.0).round() / 1000.0;
        let options = serde_json::json!({
            "formats": s.formats.iter().map(|f| f.label()).collect::<Vec<_>>(),
            "calib": s.calibration.as_ref().map(|(path, _, format)| format!("{} ({})", path.display(), format.name())),
            "max_depth": s.max_depth,
            "max_uncertainty": s.max_uncertainty,
            "scale": s.scale,
            "overwrite": s.overwrite,
            "fail_fast": s.fail_fast,
            "pipeline_depth": s.pipeline_depth,
            "every": s.pick.every,
            "start": s.pick.start_seconds,
            "duration": s.pick.duration_seconds,
        });
        Summary {
            pairs: plan.items.len() as u64,
            pairs_all_shards: plan.total_pairs,
            shard: s.shard.to_string(),
            done: report.done,
            skipped_existing: report.skipped,
            failed: report.failures.len(),
            failures: &report.failures,
            interrupted,
            seconds,
            pairs_per_second: if seconds > 0.0 {
                (report.done as f64 / seconds * 1000.0).round() / 1000.0
            } else {
                0.0
            },
            engine_busy: report.engine_busy().map(|b| (b * 1000.0).round() / 1000.0),
            device: model.map(|m| m.device.as_str()),
            model: model.map(|m| m.name.as_str()),
            precision: model.map(|m| m.precision.as_str()),
            inputs: plan.inputs.iter().map(|i| i.label.as_str()).collect(),
            out,
            video_out,
            options,
        }
    }

    /// The file it is written to: one per shard, so shards can share `--out`.
    pub fn path(out: &Path, plan: &Plan) -> PathBuf {
        let shard = plan.settings.shard;
        if shard.count == 1 {
            out.join("summary.json")
        } else {
            out.join(format!("summary-shard-{}-of-{}.json", shard.index, shard.count))
        }
    }

    /// What the command prints at the end.
    pub fn text(&self, summary_path: &Path) -> String {
        let mut text = format!(
            "{} pair(s){}: {} written, {} already done, {} failed in {:.1} s ({:.2} pairs/s{}{})",
            self.pairs,
            if self.shard == "0/1" {
                String::new()
            } else {
                format!(" in shard {} of {}", self.shard, self.pairs_all_shards)
            },
            self.done,
            self.skipped_existing,
            self.failed,
            self.seconds,
            self.pairs_per_second,
            self.device.map(|d| format!(" on {d}")).unwrap_or_default(),
            self.engine_busy.map(|b| format!(", engine busy {:.0} %", b * 100.0)).unwrap_or_default(),
        );
        if self.interrupted {
            text.push_str("\nstopped before every pair was tried; run the same command again to go on");
        }
        for failure in self.failures {
            text.push_str(&format!("\nfailed: {} ({}): {}", failure.pair, failure.input, failure.reason));
        }
        if let Some(video) = self.video_out {
            text.push_str(&format!("\nvideo: {}", video.display()));
        }
        text.push_str(&format!("\nsummary: {}", summary_path.display()));
        text
    }
}
