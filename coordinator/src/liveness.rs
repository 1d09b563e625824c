//! Whether workers are alive, recorded outside the round actor: a heartbeat stamps its session
//! here before it is queued, so a busy actor (reducing chunks) never takes a healthy worker for
//! a dead one; and the connection a session's heartbeats arrive on is watched, so a worker
//! whose process died (its sockets closed by the kernel, as after SIGKILL) is known at once
//! rather than after three missed heartbeats.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Default)]
struct Sessions {
    /// Session id -> last heartbeat and the peer address it came from.
    seen: HashMap<String, (Instant, Option<SocketAddr>)>,
    /// Connections closed since the actor last looked.
    closed: Vec<SocketAddr>,
}

/// Shared by the gRPC handlers (heartbeats), the accepted connections (their close) and the
/// actor (which reads it every tick).
#[derive(Clone, Default)]
pub(crate) struct Liveness(Arc<Mutex<Sessions>>);

impl Liveness {
    /// A session the actor knows (it joined): from now on its heartbeats are recorded.
    pub fn track(&self, id: &str) {
        if let Ok(mut s) = self.0.lock() {
            s.seen.insert(id.to_string(), (Instant::now(), None));
        }
    }

    /// A session that is gone for good (replaced by a rejoin, or left).
    pub fn forget(&self, id: &str) {
        if let Ok(mut s) = self.0.lock() {
            s.seen.remove(id);
        }
    }

    /// A heartbeat of a known session, from `peer`. Unknown ids are ignored (the actor
    /// answers them NotFound), so a flood of made-up ids costs no memory here.
    pub fn beat(&self, id: &str, peer: Option<SocketAddr>) {
        if let Ok(mut s) = self.0.lock()
            && let Some(e) = s.seen.get_mut(id)
        {
            *e = (Instant::now(), peer.or(e.1));
        }
    }

    fn closed(&self, peer: SocketAddr) {
        if let Ok(mut s) = self.0.lock() {
            // Only connections a session beats on matter; the rest (probes, pulls of
            // clients that are not workers) are not kept.
            if s.seen.values().any(|(_, p)| *p == Some(peer)) {
                s.closed.push(peer);
            }
        }
    }

    /// The last heartbeat of every known session, and the sessions whose heartbeat connection
    /// closed since the last call (each reported once).
    pub fn take(&self) -> (HashMap<String, Instant>, Vec<String>) {
        let Ok(mut s) = self.0.lock() else {
            return (HashMap::new(), vec![]);
        };
        let closed = std::mem::take(&mut s.closed);
        let lost: Vec<String> = s
            .seen
            .iter()
            .filter(|(_, (_, p))| p.is_some_and(|p| closed.contains(&p)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &lost {
            // A later heartbeat (on a new connection) records its address again.
            if let Some(e) = s.seen.get_mut(id) {
                e.1 = None;
            }
        }
        let stamps = s.seen.iter().map(|(id, (t, _))| (id.clone(), *t)).collect();
        (stamps, lost)
    }

    /// A guard that reports the close of the connection from `peer` when dropped.
    pub fn on_close(&self, peer: SocketAddr) -> OnClose {
        OnClose {
            peer: Some(peer),
            liveness: self.clone(),
        }
    }
}

/// Reports a connection's close when dropped (the server drops a connection when the peer
/// closed it, it failed, or the server shut down).
pub(crate) struct OnClose {
    peer: Option<SocketAddr>,
    liveness: Liveness,
}

impl Drop for OnClose {
    fn drop(&mut self) {
        if let Some(p) = self.peer {
            self.liveness.closed(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_heartbeat_connection_reports_its_session_once() {
        let l = Liveness::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:2000".parse().unwrap(),
        );
        l.track("s1");
        l.track("s2");
        l.beat("s1", Some(a));
        l.beat("s2", Some(b));
        l.beat("nobody", Some(a));
        l.closed(a);
        let (stamps, lost) = l.take();
        assert_eq!(lost, vec!["s1".to_string()]);
        assert_eq!(stamps.len(), 2, "unknown ids are not recorded");
        assert!(l.take().1.is_empty(), "reported once");
        // Back on a new connection: watched again.
        let c: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        l.beat("s1", Some(c));
        l.closed(a);
        assert!(l.take().1.is_empty(), "the old connection no longer counts");
        l.forget("s1");
        l.closed(c);
        assert!(l.take().1.is_empty());
    }
}
