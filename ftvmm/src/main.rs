//! `ftvmm`: one replica of an ftvm VM. See `ftvmm --help`.
//!
//! A thin front end over the crates beside it: `ftvm-machine` (the VM), `ftvm-pair` (the
//! log channel, go-live, cloning), `ftvm-contract` (flags, status line and exit statuses
//! shared with ftd). Here: the command line, the control socket, and what each outcome
//! means as an exit status and a report.

mod cli;
mod control;
mod replay;
mod report;
mod run;
mod sandbox;

use cli::{Command, LogCommand};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Replay(args) => replay::replay(args),
        Command::Log(LogCommand::Inspect { log, from, to }) => replay::inspect_log(&log, from, to),
        Command::Generate { what } => {
            use clap::CommandFactory;
            ftvm_contract::manual::print(cli::Cli::command(), what, "8")
        }
        Command::Cpu => match ftvm_machine::vm::host_cpu() {
            Ok(cpu) => {
                println!("{cpu}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("ftvmm: {}", report::one_line(&err));
                ExitCode::from(71)
            }
        },
    }
}
