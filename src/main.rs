//! Entry point: parse the command line, set up logging, run the subcommand.

use std::process::ExitCode;

use clap::Parser;
use stereo_recon::cli;
use stereo_recon::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // RUST_LOG overrides; by default our crate logs at info and libraries at warn.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,stereo_recon=info"));
    // Logs go to stderr (stdout carries `predict`'s result); colour only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        // One JSON object a line: the event's fields at the top level, the
        // request span's fields (request_id, method, path, size) under "span".
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        Command::Serve(config) => return runtime.block_on(cli::serve(config)),
        Command::Predict(args) => runtime.block_on(cli::predict(args)),
        Command::Eval(args) => runtime.block_on(cli::eval(args)),
        Command::Batch(args) => runtime.block_on(cli::batch::run(args)),
        Command::RenderSynthetic(args) => cli::render_synthetic(args),
        Command::Healthcheck(args) => stereo_recon::healthcheck::run(&args.check()),
    };
    match outcome {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
