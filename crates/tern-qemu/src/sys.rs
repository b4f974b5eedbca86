//! The only unsafe code in tern-qemu: asking the kernel to kill QEMU when the agent that
//! started it dies, so an agent crash never leaves an orphan VM behind. (QEMU's own
//! `-run-with exit-with-parent=on` is not in every build: Debian's 10.0 lacks it.)
#![allow(unsafe_code)]

/// Makes the child get SIGKILL when the thread that spawned it exits (PR_SET_PDEATHSIG).
/// tern spawns QEMU from tokio worker threads, which live as long as the agent's runtime.
pub fn kill_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
