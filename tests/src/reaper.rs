//! Cleanup that runs when the test process ends, however it ends.
//!
//! Shared fixtures (the control plane, the test bridge) live in statics that
//! are never dropped, and a failing or killed test binary runs no
//! destructors. So the first registration starts a detached helper
//! (`mizzen-reaper`) holding the read end of a pipe whose write end only
//! this process has: when this process exits for any reason the pipe closes
//! and the helper runs the registered shell commands, newest first.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

struct Reaper {
    script: PathBuf,
    /// Kept open for the life of the process; never written.
    _child: Child,
}

static REAPER: OnceLock<Result<Mutex<Reaper>, String>> = OnceLock::new();

fn start() -> Result<Mutex<Reaper>, String> {
    let dir = std::env::temp_dir().join(format!("mizzen-reaper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let script = dir.join("cleanup.sh");
    std::fs::write(&script, "").map_err(|e| format!("write {}: {e}", script.display()))?;
    // `cat` returns when every write end of its stdin is closed, i.e. when
    // this process is gone (Rust opens pipes close-on-exec, so children of
    // the tests do not inherit it).
    let child = Command::new("setsid")
        .args([
            "bash",
            "-c",
            r#"cat >/dev/null; tac "$1" | bash >/dev/null 2>&1; rm -rf "$(dirname "$1")"; true"#,
            "mizzen-reaper",
        ])
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the cleanup helper (needs setsid and bash from util-linux): {e}"))?;
    Ok(Mutex::new(Reaper { script, _child: child }))
}

/// Runs `shell_command` when this process exits. Commands must be idempotent:
/// the fixture's own `Drop` may have done the work already.
pub fn at_exit(shell_command: &str) {
    let reaper = match REAPER.get_or_init(start) {
        Ok(r) => r,
        Err(e) => panic!("cannot register cleanup: {e}"),
    };
    let reaper = reaper.lock().unwrap_or_else(|p| p.into_inner());
    let line = shell_command.replace('\n', " ");
    let res = std::fs::OpenOptions::new()
        .append(true)
        .open(&reaper.script)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = res {
        panic!("cannot register cleanup in {}: {e}", reaper.script.display());
    }
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
