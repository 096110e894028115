//! Man pages and shell completions generated from a binary's clap definition, so that
//! they never disagree with its flags. Each binary prints them on request
//! (`ftctl completions SHELL`, and the hidden `generate` of ftd, ftvmm and ftctl that
//! `cargo xtask package` calls).

/// What can be generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generated {
    /// The man page (roff).
    Man,
    /// bash completions.
    Bash,
    /// zsh completions.
    Zsh,
    /// fish completions.
    Fish,
}

/// `what` for the command `command` (its name is the binary's); a man page goes in
/// `section` (1 for user commands, 8 for administration).
pub fn generate(
    mut command: clap::Command,
    what: Generated,
    section: &str,
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let name = command.get_name().to_owned();
    let shell = match what {
        Generated::Man => {
            clap_mangen::Man::new(command)
                .section(section)
                .render(&mut out)?;
            return Ok(out);
        }
        Generated::Bash => clap_complete::Shell::Bash,
        Generated::Zsh => clap_complete::Shell::Zsh,
        Generated::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, name, &mut out);
    Ok(out)
}

/// Prints `what` for `command` (man page `section`) on stdout; the process's exit status.
pub fn print(command: clap::Command, what: Generated, section: &str) -> std::process::ExitCode {
    use std::io::Write;
    match generate(command, what, section).and_then(|text| std::io::stdout().write_all(&text)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cannot write: {err}");
            std::process::ExitCode::from(crate::exit::VMM_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    #[command(name = "demo", about = "A demo command")]
    struct Demo {
        /// The flag's help.
        #[arg(long)]
        flag: bool,
    }

    #[test]
    fn the_man_page_and_completions_come_from_the_flags() {
        use clap::CommandFactory;
        let man =
            String::from_utf8(generate(Demo::command(), Generated::Man, "8").unwrap()).unwrap();
        assert!(man.contains(".TH demo 8") && man.contains("flag") && man.contains("The flag"));
        for (shell, needle) in [
            (Generated::Bash, "--flag"),
            (Generated::Zsh, "--flag"),
            (Generated::Fish, "-l flag"),
        ] {
            let text = String::from_utf8(generate(Demo::command(), shell, "1").unwrap()).unwrap();
            assert!(text.contains(needle), "{shell:?}: {text}");
        }
    }
}
