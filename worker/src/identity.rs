//! How a worker names itself when the operator does not: the name a coordinator knows it by,
//! and the rank it asks for. Kubernetes Indexed Jobs give every pod `JOB_COMPLETION_INDEX`, so
//! a restarted pod asks for its old rank and name (see deploy/k8s/base/worker-job.yaml).

/// The name and preferred rank of this worker: `name` when given; else `worker-<rank>` with
/// the rank from `rank` or `JOB_COMPLETION_INDEX`; else `<host name>-<process id>`.
pub fn identity(name: Option<String>, rank: Option<u32>) -> (String, Option<u32>) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    identity_from(
        name,
        rank,
        std::env::var("JOB_COMPLETION_INDEX").ok().as_deref(),
        host.as_deref(),
        std::process::id(),
    )
}

fn identity_from(
    name: Option<String>,
    rank: Option<u32>,
    job_index: Option<&str>,
    host: Option<&str>,
    pid: u32,
) -> (String, Option<u32>) {
    let rank = rank.or_else(|| job_index.and_then(|v| v.trim().parse().ok()));
    let name = match (name, rank, host.map(str::trim)) {
        (Some(n), _, _) => n,
        (None, Some(r), _) => format!("worker-{r}"),
        (None, None, Some(h)) if !h.is_empty() => format!("{h}-{pid}"),
        (None, None, _) => format!("worker-{pid}"),
    };
    (name, rank)
}

#[cfg(test)]
mod tests {
    use super::identity_from;

    #[test]
    fn names_come_from_the_flag_the_rank_or_the_host() {
        let id = |name: Option<&str>, rank, job, host| {
            identity_from(name.map(String::from), rank, job, host, 42)
        };
        assert_eq!(
            id(Some("a"), Some(3), Some("5"), Some("h")),
            ("a".into(), Some(3))
        );
        assert_eq!(
            id(None, Some(3), Some("5"), Some("h")),
            ("worker-3".into(), Some(3))
        );
        assert_eq!(
            id(None, None, Some("5"), Some("h")),
            ("worker-5".into(), Some(5))
        );
        assert_eq!(id(Some("a"), None, Some("5"), None), ("a".into(), Some(5)));
        assert_eq!(
            id(None, None, Some("x"), Some("pod\n")),
            ("pod-42".into(), None)
        );
        assert_eq!(id(None, None, None, None), ("worker-42".into(), None));
    }
}
