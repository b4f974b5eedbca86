//! Shell completions and man pages, generated from the command-line definition itself
//! (so they never drift from `--help`): `tern completions SHELL`, `tern man OUT`. The
//! Debian package ships both (scripts/package.sh).

use std::path::Path;

use clap::CommandFactory;

/// Why the man pages were not written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write man pages into {dir}")]
pub struct ManError {
    dir: String,
    #[source]
    source: std::io::Error,
}

/// Writes `shell`'s completion script for `tern`.
pub fn completions(
    shell: clap_complete::Shell,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(shell, &mut cmd, "tern", out);
    out.flush()
}

/// Writes `tern.1` and one page per command (`tern-vm-start.1`, ...) into `dir`; how many.
pub fn man_pages(dir: &Path) -> Result<usize, ManError> {
    let err = |source| ManError {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let before = count(dir).map_err(err)?;
    clap_mangen::generate_to(crate::Cli::command(), dir).map_err(err)?;
    Ok(count(dir).map_err(err)? - before)
}

fn count(dir: &Path) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_gets_a_man_page_that_names_its_flags() {
        let dir = tempfile::tempdir().unwrap();
        let n = man_pages(dir.path()).unwrap();
        assert!(n >= 10, "{n} pages");
        let migrate = std::fs::read_to_string(dir.path().join("tern-migrate.1")).unwrap();
        assert!(migrate.contains("max\\-bandwidth"), "{migrate}");
        let agent = std::fs::read_to_string(dir.path().join("tern-agent.1")).unwrap();
        assert!(
            agent.contains("config"),
            "the agent's page documents --config"
        );
    }

    #[test]
    fn bash_completion_knows_the_subcommands() {
        let mut out = Vec::new();
        completions(clap_complete::Shell::Bash, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        for sub in ["migrate", "agent", "vm", "events", "completions"] {
            assert!(s.contains(sub), "{sub} missing");
        }
    }
}
