//! `ftd`: the ftvm host daemon (see the library for what it does).

use clap::Parser;
use ftd::config::{Args, Config, LogFormat};
use ftd::error_chain;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(what) = args.generate {
        use clap::CommandFactory;
        return ftvm_contract::manual::print(Args::command(), what, "8");
    }
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("ftd: {}", error_chain(&err));
            return ExitCode::from(64);
        }
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(config.log_level)
        .with_target(false)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => subscriber.json().init(),
        // journald stamps every line itself: leave the time out when running under it.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            subscriber.without_time().init()
        }
        LogFormat::Text => subscriber.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ftd: cannot start the async runtime: {err}");
            return ExitCode::from(71);
        }
    };
    match runtime.block_on(ftd::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{}", error_chain(&err));
            eprintln!("ftd: {}", error_chain(&err));
            ExitCode::from(69)
        }
    }
}
