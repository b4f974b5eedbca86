//! How the engine says what went wrong: the whole chain of an error once, for reports and
//! logs, and what a caught panic said. Each operation's error type lives with the
//! operation (`source::MigrateError`, `dest::IncomingError`, the disk errors).

/// The whole chain of an error, once, for reports and logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What a caught panic said, for an error message.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
