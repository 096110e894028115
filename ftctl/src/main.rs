//! `ftctl`: the command-line client of the ftvm control plane (see the library).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = ftctl::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ftctl: cannot start the async runtime: {err}");
            return ExitCode::from(71);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(ftctl::run(cli, &mut stdout)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ftctl: {err}");
            err.exit_code()
        }
    }
}
