//! How a failed command ends: one line on stderr, and the exit status.
//!
//! 2 for a configuration error (a bad flag or value, missing data: retrying will not help, and
//! Kubernetes' pod failure policy fails the job at once), 1 for anything else. Each library
//! error says which it is (`is_config`); clap's own usage errors also exit with 2.

/// A configuration problem found by the binary itself (flags that do not fit together).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A worker stopped by a signal before training finished. It exits 143 (128 + SIGTERM), not 0,
/// so that Kubernetes does not count an Indexed Job's index as completed and starts a pod that
/// takes its place.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal before training finished")]
pub struct Stopped;

/// The error and its causes on one line, leaving out causes whose text the line already holds
/// (our errors name their source in their own message).
pub fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The exit status for an error: 143 for [`Stopped`], 2 when any error in its chain is a
/// configuration error, else 1.
pub fn code(e: &anyhow::Error) -> i32 {
    if e.is::<Stopped>() {
        return 143;
    }
    let config = e.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause
                .downcast_ref::<capsnet_core::CoreError>()
                .is_some_and(|e| e.is_config())
            || cause
                .downcast_ref::<capsnet_coordinator::CoordinatorError>()
                .is_some_and(|e| e.is_config())
            || cause
                .downcast_ref::<capsnet_worker::WorkerError>()
                .is_some_and(|e| e.is_config())
            || cause
                .downcast_ref::<capsnet_bench::BenchError>()
                .is_some_and(|e| e.is_config())
    });
    if config { 2 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use capsnet_core::CoreError;

    #[test]
    fn configuration_errors_exit_2_and_resource_errors_1() {
        let config = anyhow::Error::from(CoreError::Config("batch size must be at least 1".into()))
            .context("starting");
        assert_eq!(code(&config), 2);
        let wrapped = anyhow::Error::from(capsnet_worker::WorkerError::Core(CoreError::Io {
            path: "/data".into(),
            source: std::io::Error::other("too many open files"),
        }));
        assert_eq!(code(&wrapped), 1, "a resource problem may go away on retry");
        let tls = anyhow::Error::from(capsnet_worker::WorkerError::TokenNotAscii);
        assert_eq!(code(&tls), 2);
        let diverged = anyhow::Error::from(CoreError::Diverged {
            step: 3,
            loss: f64::NAN,
        });
        assert_eq!(code(&diverged), 2, "the same run diverges again");
        let own: anyhow::Result<()> = Err(ConfigError("--steps must be at least 1".into()).into());
        assert_eq!(code(&own.context("bench").unwrap_err()), 2);
        assert_eq!(code(&anyhow::anyhow!("disk on fire")), 1);
    }

    #[test]
    fn report_skips_causes_already_in_the_line() {
        let e = anyhow::Error::from(CoreError::Config("bad".into())).context("invalid config: bad");
        assert_eq!(report(&e), "invalid config: bad");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(report(&e), "outer: inner");
    }
}
