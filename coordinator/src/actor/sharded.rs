//! A sharded run (`--reducers N`): reducer processes own contiguous spans of the grid, balanced
//! by bytes, with the optimizer state of their spans; workers push each span to its owner and
//! pull it from there. The grid holds the flat vector's chunks in stripe order
//! ([`capsnet_proto::wire::stripe_order`]), so each span holds a share of every layer; the
//! state this actor keeps is in the vector's order, what it sends and gathers in the grid's.
//! This actor keeps what it keeps in any run (members, rounds, deadlines, shards of the data,
//! evaluation, checkpoints) and drives the reducers over their sessions:
//!
//! - a round opens on every reducer with its members (`Open`), and the set it waits for is
//!   kept up to date (`Expect`);
//! - a reducer reports each member's update complete on its span with the span's sum of
//!   squares; once every reducer has, the update's norm is judged as in one process (rejected:
//!   `Abort` everywhere; clipped: `Rescale` everywhere);
//! - a round closes in two phases: `Close` over the members complete everywhere, each reducer
//!   answers whether its new state is finite, and only when all are is it committed (by the
//!   next `Open`), else `Discard`ed and redone;
//! - the state is gathered (`Gather`) for evaluation and checkpoints: it is also what a
//!   reducer's death rolls the run back to. The spans are then assigned again over the live
//!   reducers from that state, the round counter and data position go back with it, and workers
//!   see the new layout in their next work order. What is lost: the rounds since the last
//!   gather (at least every `--gather-every`, and at each checkpoint). A reducer that joins
//!   takes a span from a gather made for it instead, which costs no round.
//! - a worker that says it cannot reach a reducer (GetWork's `cannot_reach`) gets no work
//!   while other workers reach that reducer; a reducer that no live worker reaches is dropped
//!   as if it had died, and one that joins again at the same address waits as a spare for a
//!   while (30 s, doubling with each drop up to 10 min) before it takes a span again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::{Duration, Instant};

use capsnet_core::checkpoint::DataPosition;
use capsnet_proto::{SyncMode, pb};
use pb::reducer_order::Order;
use pb::reducer_report::Report;
use tokio::sync::mpsc::UnboundedSender;

use super::Actor;
use crate::error::{CoordinatorError, Result};
use crate::plan::EpochCursor;
use crate::shard::{fill, pieces};
use capsnet_proto::wire::{to_grid_order, to_vector_order};

/// A reducer's session.
pub(super) struct Link {
    pub(super) session: u64,
    pub(super) name: String,
    pub(super) address: String,
    orders: UnboundedSender<pb::ReducerOrder>,
}

impl Link {
    fn send(&self, o: Order) {
        let _ = self.orders.send(pb::ReducerOrder { order: Some(o) });
    }
}

/// What waits for a gather to finish.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct AfterGather {
    pub(super) eval: bool,
    pub(super) checkpoint: bool,
    pub(super) finish: bool,
    /// Assign the spans anew (a spare can take one) from the state gathered.
    pub(super) relayout: bool,
}

struct Gathering {
    /// The state is the one before this round, at this data position, after this many Adam
    /// steps (taken when the gather was ordered: what happens meanwhile does not move them).
    round: u64,
    position: DataPosition,
    step: u64,
    since: Instant,
    /// Floats received from each reducer of the layout.
    got: Vec<usize>,
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    then: AfterGather,
}

struct Closing {
    round: u64,
    members: Vec<usize>,
    /// Each reducer's answer: its new state is finite.
    answers: Vec<Option<bool>>,
    since: Instant,
}

/// A reducer at an address no worker could reach waits as a spare until `until` (None: the
/// wait is over); `length` was the last wait's, which the next drop doubles.
struct Wait {
    until: Option<Instant>,
    length: Duration,
}

pub(super) struct Shards {
    /// Reducers a layout uses at most (`--reducers`).
    want: usize,
    next_session: u64,
    /// The reducers of the layout in span order, their spans of the grid, and whether each
    /// has its span's state.
    layout: Vec<(Link, Range<usize>, bool)>,
    /// Connected reducers not in the layout (taken when the layout changes).
    spares: Vec<Link>,
    /// Changes with each assignment of the spans.
    layout_id: u64,
    /// The open round's members' updates as each reducer of the layout reported them complete
    /// (sum of squares, loss).
    reports: BTreeMap<usize, Vec<Option<(f64, f64)>>>,
    /// Members whose whole update was judged and accepted.
    accepted: BTreeSet<usize>,
    /// The waited-for members last told to the reducers.
    told: Vec<usize>,
    closing: Option<Closing>,
    gathering: Option<Gathering>,
    /// The next `Open` commits the round closed before it.
    commit: bool,
    /// A spare can take a span once the close under way is done (the state is gathered
    /// then, and the spans assigned anew from it).
    take_spare_after_close: bool,
    /// The state in the actor's `params`, `adam` and `outer_m` is the state before this round
    /// at this data position, after this many Adam steps: what a rollback returns to.
    known_good: (u64, DataPosition, u64),
    /// Addresses of reducers dropped because no worker could reach them.
    quarantine: HashMap<String, Wait>,
    /// When the last gather began (or the run, before the first).
    gathered_at: Instant,
}

impl Shards {
    pub(super) fn new(want: usize, round: u64, position: DataPosition, step: u64) -> Self {
        Shards {
            want,
            next_session: 0,
            layout: vec![],
            spares: vec![],
            layout_id: 0,
            reports: BTreeMap::new(),
            accepted: BTreeSet::new(),
            told: vec![],
            closing: None,
            gathering: None,
            commit: false,
            take_spare_after_close: false,
            known_good: (round, position, step),
            gathered_at: Instant::now(),
            quarantine: HashMap::new(),
        }
    }

    /// Whether the layout has a reducer at `address`.
    fn serves(&self, address: &str) -> bool {
        self.layout.iter().any(|(l, _, _)| l.address == address)
    }

    /// Whether a reducer at `address` waits as a spare (no worker could reach the last one
    /// there).
    fn quarantined(&self, address: &str, now: Instant) -> bool {
        (self.quarantine.get(address)).is_some_and(|w| w.until.is_some_and(|u| u > now))
    }

    /// Spares that may take a span now.
    fn takeable_spares(&self, now: Instant) -> usize {
        (self.spares.iter())
            .filter(|l| !self.quarantined(&l.address, now))
            .count()
    }

    /// `--gather-every` has passed since the last gather began.
    pub(super) fn gather_due(&self, every: std::time::Duration) -> bool {
        !every.is_zero() && self.gathered_at.elapsed() >= every
    }

    /// Every reducer of the layout has its span's state.
    pub(super) fn ready(&self) -> bool {
        !self.layout.is_empty() && self.layout.iter().all(|(_, _, r)| *r)
    }

    /// A close or gather is under way: the round may not close again meanwhile.
    pub(super) fn busy(&self) -> bool {
        self.closing.is_some() || self.gathering.is_some()
    }

    pub(super) fn accepted(&self, k: usize) -> bool {
        self.accepted.contains(&k)
    }

    /// Members with an accepted update, in member order.
    pub(super) fn completed(&self) -> Vec<usize> {
        self.accepted.iter().copied().collect()
    }

    /// Member `k` sent part of its update somewhere (or all of it).
    pub(super) fn has(&self, k: usize) -> bool {
        self.accepted.contains(&k) || self.reports.contains_key(&k)
    }

    pub(super) fn layout_id(&self) -> u64 {
        self.layout_id
    }

    pub(super) fn known_good(&self) -> (u64, DataPosition, u64) {
        self.known_good.clone()
    }

    /// Where each span lives, for work orders.
    pub(super) fn owners(&self) -> Vec<pb::SpanOwner> {
        self.layout
            .iter()
            .map(|(l, s, _)| pb::SpanOwner {
                address: l.address.clone(),
                first_chunk: s.start as u32,
                end_chunk: s.end as u32,
            })
            .collect()
    }

    pub(super) fn all(&self, o: Order) {
        for (l, _, _) in &self.layout {
            l.send(o.clone());
        }
    }

    /// Forgets the open round's updates (a new round, or the same planned again).
    fn clear_round(&mut self) {
        self.reports.clear();
        self.accepted.clear();
        self.told.clear();
    }
}

/// `x[r]`, or nothing when `x` is not kept.
fn part(x: &[f32], r: Range<usize>) -> &[f32] {
    if x.is_empty() { &[] } else { &x[r] }
}

/// A URL a worker can dial: http(s)://host:port or unix:/path (workers of the reducer's
/// machine), printable, short.
fn valid_address(a: &str) -> bool {
    (a.starts_with("http://") || a.starts_with("https://") || a.starts_with("unix:/"))
        && a.len() <= 256
        && a.chars().all(|c| c.is_ascii_graphic())
}

/// How long a reducer at an address no worker could reach waits as a spare, the first time
/// and at most (each drop there doubles it); addresses remembered at most.
const QUARANTINE_FIRST: Duration = Duration::from_secs(30);
const QUARANTINE_MAX: Duration = Duration::from_secs(600);
const QUARANTINE_ENTRIES: usize = 256;

impl Actor {
    pub(super) fn shards(&self) -> Option<&Shards> {
        self.shards.as_ref()
    }

    /// A reducer opened its session: it joins the layout if the layout wants more reducers
    /// (assigning the spans anew, from the last gathered state), else it waits as a spare.
    pub(super) fn reducer_joined(
        &mut self,
        hello: pb::ReducerHello,
        orders: UnboundedSender<pb::ReducerOrder>,
    ) -> Result<u64> {
        let Some(sh) = self.shards.as_mut() else {
            return Err(CoordinatorError::InvalidArgument(
                "this coordinator reduces every update itself; start it with --reducers N to \
                 use reducers"
                    .into(),
            ));
        };
        if !valid_address(&hello.address) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "a reducer must advertise an http://, https:// or unix:/ URL (at most 256 characters), \
                 not {:?}",
                hello.address
            )));
        }
        let name: String = hello.name.chars().take(128).collect();
        sh.next_session += 1;
        let session = sh.next_session;
        tracing::info!(reducer = %name, address = %hello.address, session, "reducer joined");
        sh.spares.push(Link {
            session,
            name,
            address: hello.address.clone(),
            orders,
        });
        // The first layout waits for --reducers of them; a layout that lost some takes one
        // back as soon as it joins.
        let now = Instant::now();
        if let Some(until) =
            (sh.quarantine.get(&hello.address)).and_then(|w| w.until.filter(|u| *u > now))
        {
            tracing::warn!(address = %hello.address, wait = ?(until - now), "no worker could reach the last reducer at this address: this one waits as a spare");
        }
        let wanted = if sh.layout_id == 0 {
            sh.takeable_spares(now) >= sh.want
        } else {
            sh.layout.len() < sh.want && sh.takeable_spares(now) > 0
        };
        if wanted && !self.finished {
            self.take_spare("a reducer joined");
        }
        Ok(session)
    }

    /// A reducer's session ended: its spans move to the live reducers, from the last
    /// gathered state.
    pub(super) fn reducer_lost(&mut self, session: u64) {
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        sh.spares.retain(|l| l.session != session);
        let Some(at) = sh.layout.iter().position(|(l, _, _)| l.session == session) else {
            return;
        };
        let (l, span, _) = sh.layout.remove(at);
        tracing::warn!(reducer = %l.name, address = %l.address, chunks = ?span, "reducer lost");
        if !self.finished {
            self.relayout("a reducer was lost");
        }
    }

    /// Whether `w` said it cannot reach a reducer of the layout that stands.
    pub(super) fn is_cut_off(&self, w: &super::membership::Worker) -> bool {
        match (&w.cut_off, self.shards()) {
            (Some((address, layout)), Some(sh)) => *layout == sh.layout_id && sh.serves(address),
            _ => false,
        }
    }

    /// Whether worker `name` is known and not cut off from a reducer of the layout.
    pub(super) fn reaches_every_reducer(&self, name: &str) -> bool {
        (self.members.workers.get(name)).is_some_and(|w| !self.is_cut_off(w))
    }

    /// Worker `name` says it cannot reach the reducer at `address` (None: it reaches them
    /// all). It gets no work while some live worker reaches every reducer. Once none does
    /// (every live worker is cut off, from that reducer or from others: no round could
    /// complete), the reducer the most live workers cannot reach is dropped; the first of the
    /// layout's order among equals.
    pub(super) fn cannot_reach(&mut self, name: &str, address: Option<String>) {
        let Some(sh) = self.shards.as_ref() else {
            return;
        };
        let layout = sh.layout_id;
        let now = address.filter(|a| sh.serves(a)).map(|a| (a, layout));
        let Some(w) = self.members.workers.get_mut(name) else {
            return;
        };
        if w.cut_off == now {
            return;
        }
        match (&now, &w.cut_off) {
            (Some((a, _)), _) => {
                tracing::warn!(worker = %w.id, %name, reducer = %a, "the worker cannot reach a reducer: no work for it while other workers reach that reducer")
            }
            (None, Some((a, _))) if sh.serves(a) => {
                tracing::info!(worker = %w.id, %name, reducer = %a, "the worker reaches every reducer again")
            }
            (None, _) => {}
        }
        w.cut_off = now.clone();
        if now.is_none() {
            return;
        }
        let live = self.live();
        if live.iter().any(|n| self.reaches_every_reducer(n)) {
            if self.plan.is_some() {
                // The open round no longer waits for it.
                let expected = self.expected();
                self.tell_expected(&expected);
            }
            return;
        }
        // How many live workers cannot reach each reducer of the layout, in its order.
        let Some(sh) = self.shards.as_ref() else {
            return;
        };
        let claims: Vec<(String, usize)> = (sh.layout.iter())
            .map(|(l, _, _)| {
                let n = (live.iter())
                    .filter_map(|n| self.members.workers.get(n))
                    .filter(|w| {
                        w.cut_off
                            .as_ref()
                            .is_some_and(|(a, l2)| *a == l.address && *l2 == layout)
                    })
                    .count();
                (l.address.clone(), n)
            })
            .collect();
        let most = claims.iter().map(|(_, n)| *n).max().unwrap_or(0);
        if let Some((address, n)) = claims.into_iter().find(|(_, n)| *n == most && most > 0) {
            self.drop_unreachable(&address, n, live.len());
        }
    }

    /// `claims` of the `workers` live workers cannot reach the reducer at `address`, and no
    /// live worker reaches every reducer: it is dropped as if it had died, and a reducer at
    /// that address waits as a spare for a while (longer each time) before it takes a span
    /// again.
    fn drop_unreachable(&mut self, address: &str, claims: usize, workers: usize) {
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let Some(session) = (sh.layout.iter())
            .find(|(l, _, _)| l.address == address)
            .map(|(l, _, _)| l.session)
        else {
            return;
        };
        let now = Instant::now();
        let wait = (sh.quarantine.get(address))
            .map_or(QUARANTINE_FIRST, |w| (w.length * 2).min(QUARANTINE_MAX));
        if sh.quarantine.len() >= QUARANTINE_ENTRIES {
            sh.quarantine.retain(|_, w| w.until.is_some());
        }
        sh.quarantine.insert(
            address.to_string(),
            Wait {
                until: Some(now + wait),
                length: wait,
            },
        );
        if claims == workers {
            tracing::warn!(reducer = %address, workers, ?wait, "no live worker can reach this reducer: dropping it");
        } else {
            tracing::warn!(reducer = %address, claims, workers, ?wait, "every live worker is cut off from a reducer, the most of them from this one: dropping it");
        }
        self.reducer_lost(session);
    }

    /// The layout has room for a spare: a layout that trains gathers its state first and is
    /// assigned anew from it, so that the rounds since the last gather are not lost (only the
    /// open one is planned again); after the close under way, if one is. A layout that is not
    /// ready yet is assigned anew at once.
    pub(super) fn take_spare(&mut self, why: &'static str) {
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        if sh.layout_id == 0 || !sh.ready() {
            self.relayout(why);
        } else if sh.closing.is_some() || sh.commit {
            sh.take_spare_after_close = true;
        } else {
            tracing::info!(
                why,
                round = self.round,
                "gathering the state before the spans are assigned anew"
            );
            self.gather(AfterGather {
                relayout: true,
                ..Default::default()
            });
        }
    }

    /// Whether a spare waits for the close under way to end (see [`Actor::take_spare`]).
    pub(super) fn spare_waits_for_close(&mut self) -> bool {
        self.shards
            .as_mut()
            .is_some_and(|sh| std::mem::take(&mut sh.take_spare_after_close))
    }

    /// Assigns the spans anew over the reducers of the layout and the spares (up to
    /// `--reducers`), and rolls the run back to the last gathered state: the open round and any
    /// round since are dropped, the data position goes back with the round counter.
    fn relayout(&mut self, why: &str) {
        let grid = self.reducer.grid();
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let now = Instant::now();
        let mut links: Vec<Link> = sh.layout.drain(..).map(|(l, _, _)| l).collect();
        let spares = std::mem::take(&mut sh.spares);
        let (waiting, takeable): (Vec<Link>, Vec<Link>) = spares
            .into_iter()
            .partition(|l| sh.quarantined(&l.address, now));
        links.extend(takeable);
        let take = links.len().min(sh.want).min(grid.len());
        sh.spares = links.split_off(take);
        sh.spares.extend(waiting);
        sh.layout_id += 1;
        sh.take_spare_after_close = false;
        sh.clear_round();
        sh.closing = None;
        sh.gathering = None;
        sh.commit = false;
        let (round, position, step) = sh.known_good.clone();
        // Roll back: the round counter and the data position return to the gathered state's.
        if self.round != round {
            tracing::warn!(
                from = self.round,
                to = round,
                why,
                "rolling back to the last gathered state"
            );
        } else if self.plan.is_some() {
            tracing::info!(
                round,
                why,
                "the open round is planned again under the new layout"
            );
        }
        self.plan = None;
        self.round = round;
        self.adam.step = step;
        self.cursor = EpochCursor::from_position(&position, self.n_train);
        self.first_update = None;
        self.update_done = vec![];
        let Some(spans) = capsnet_proto::wire::spans(&grid, take) else {
            tracing::warn!(why, "no reducer is live: waiting for one");
            self.published.send_modify(|_| {});
            return;
        };
        let outer = self.cfg.outer;
        let config = self.run_msg.clone();
        let stall_ms = u64::try_from(self.cfg.stall_timeout.as_millis()).unwrap_or(u64::MAX);
        let grad = self.cfg.sync_mode == SyncMode::Grad;
        // The reducers hold their spans in grid order.
        let ordered = |x: &[f32]| to_grid_order(x, &grid, &self.place);
        let params = ordered(&self.params.data);
        let (m_all, v_all) = if grad {
            (ordered(&self.adam.m), ordered(&self.adam.v))
        } else if outer.is_some() {
            (ordered(&self.outer_m), vec![])
        } else {
            (vec![], vec![])
        };
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        for (l, span) in links.into_iter().zip(spans) {
            let (lo, hi) = (grid[span.start].start, grid[span.end - 1].end);
            tracing::info!(reducer = %l.name, chunks = ?span, floats = hi - lo, layout = sh.layout_id, round, "span assigned");
            l.send(Order::Assign(pb::AssignSpan {
                config: Some(config.clone()),
                round,
                step,
                first_chunk: span.start as u32,
                end_chunk: span.end as u32,
                layout: sh.layout_id,
                outer_lr: outer.map(|o| o.lr),
                outer_momentum: outer.map_or(0.0, |o| o.momentum),
                stall_ms,
            }));
            let (m, v) = (part(&m_all, lo..hi), part(&v_all, lo..hi));
            for p in pieces(round, lo, &params[lo..hi], m, v) {
                l.send(Order::State(p));
            }
            sh.layout.push((l, span, false));
        }
        // Waiting work orders learn of the new layout once the reducers are ready.
        self.published.send_modify(|_| {});
    }

    /// What a reducer reported.
    pub(super) fn reducer_report(&mut self, session: u64, report: Report) {
        let round = self.round;
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let Some(j) = sh.layout.iter().position(|(l, _, _)| l.session == session) else {
            return;
        };
        let n = sh.layout.len();
        match report {
            Report::Hello(_) => {}
            Report::Ready(r) => {
                if r.round == round && r.layout == sh.layout_id && !sh.layout[j].2 {
                    sh.layout[j].2 = true;
                    if sh.ready() {
                        tracing::info!(
                            reducers = n,
                            layout = sh.layout_id,
                            round,
                            "every reducer has its span"
                        );
                    }
                }
            }
            // Reports of a reducer that has not its span yet belong to an earlier layout.
            _ if !sh.layout[j].2 => {}
            Report::Complete(c) => {
                let k = c.member as usize;
                let in_round = c.round == round
                    && sh.closing.is_none()
                    && self.plan.as_ref().is_some_and(|p| k < p.members.len());
                if !in_round || sh.accepted.contains(&k) {
                    return;
                }
                let first = !sh.reports.contains_key(&k);
                let slot = sh.reports.entry(k).or_insert_with(|| vec![None; n]);
                slot[j] = Some((c.sum_sq.max(0.0), c.loss));
                let whole = slot.iter().all(Option::is_some);
                let sum_sq: f64 = slot.iter().flatten().map(|(s, _)| s).sum();
                if first {
                    self.first_update.get_or_insert_with(Instant::now);
                    if let Some(name) = self.plan.as_ref().and_then(|p| p.members.get(k))
                        && let Some(w) = self.members.workers.get_mut(name)
                    {
                        w.last_round = round;
                    }
                }
                if whole {
                    tracing::trace!(target: "capsnet::timeline", round, member = k, "update whole");
                    self.judge_sharded(k, sum_sq.sqrt());
                }
            }
            Report::Aborted(a) => {
                let k = a.member as usize;
                if a.round == round
                    && !sh.accepted.contains(&k)
                    && let Some(slot) = sh.reports.get_mut(&k)
                {
                    slot[j] = None;
                    if slot.iter().all(Option::is_none) {
                        sh.reports.remove(&k);
                    }
                }
            }
            Report::Closed(c) => {
                if let Some(cl) = sh.closing.as_mut().filter(|cl| cl.round == c.round) {
                    cl.answers[j] = Some(c.finite);
                    tracing::trace!(target: "capsnet::timeline", round = c.round, reducer = j, "closed");
                    if cl.answers.iter().all(Option::is_some) {
                        self.finish_close();
                    }
                }
            }
            Report::State(p) => {
                let Some(g) = sh.gathering.as_mut().filter(|g| g.round == p.round) else {
                    return;
                };
                let span = sh.layout[j].1.clone();
                let grid = self.reducer.grid();
                let (lo, hi) = (grid[span.start].start, grid[span.end - 1].end);
                let (m, v): (&mut [f32], &mut [f32]) = (
                    if g.m.is_empty() {
                        &mut []
                    } else {
                        &mut g.m[lo..hi]
                    },
                    if g.v.is_empty() {
                        &mut []
                    } else {
                        &mut g.v[lo..hi]
                    },
                );
                match fill(&p, lo, &mut g.params[lo..hi], m, v) {
                    Ok(got) => g.got[j] += got,
                    Err(e) => {
                        tracing::error!(error = %e, "a reducer's gathered state is wrong");
                        return;
                    }
                }
                let whole = sh
                    .layout
                    .iter()
                    .zip(&g.got)
                    .all(|((_, s, _), &got)| got == grid[s.end - 1].end - grid[s.start].start);
                if whole {
                    self.finish_gather();
                }
            }
        }
    }

    /// Judges member `k`'s whole update by its norm, as [`Actor::judge_norm`] does in one
    /// process; tells the reducers to drop or scale it.
    fn judge_sharded(&mut self, k: usize, norm: f64) {
        let round = self.round;
        match self.judge_norm(k, norm) {
            Ok(()) => {
                if let Some(sh) = self.shards.as_mut() {
                    sh.accepted.insert(k);
                }
                if let Some(t) = self.update_done.get_mut(k) {
                    *t = Some(Instant::now());
                }
            }
            Err(e) => {
                tracing::warn!(round, member = k, error = %e, "update dropped on every reducer");
                if let Some(sh) = self.shards.as_mut() {
                    sh.reports.remove(&k);
                    sh.all(Order::Abort(pb::MemberRef {
                        round,
                        member: k as u32,
                    }));
                }
            }
        }
    }

    /// Member `k`'s update is scaled down by `factor` (clipped) on every reducer.
    pub(super) fn rescale_sharded(&self, k: usize, factor: f32) {
        if let Some(sh) = &self.shards {
            sh.all(Order::Rescale(pb::MemberScale {
                round: self.round,
                member: k as u32,
                factor,
            }));
        }
    }

    /// Tells the reducers the members the open round waits for, when that changed.
    pub(super) fn tell_expected(&mut self, expected: &[usize]) {
        let round = self.round;
        if let Some(sh) = self.shards.as_mut()
            && sh.told != expected
        {
            sh.told = expected.to_vec();
            sh.all(Order::Expect(pb::MemberSet {
                round,
                members: expected.iter().map(|&k| k as u32).collect(),
            }));
        }
    }

    /// Opens the planned round on every reducer (committing the round closed before, if any).
    pub(super) fn open_sharded(&mut self) {
        let round = self.round;
        let expected = self.expected();
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let members: Vec<pb::RoundMember> = self
            .plan
            .as_ref()
            .map(|p| {
                (p.members.iter().enumerate())
                    .map(|(k, name)| pb::RoundMember {
                        worker_id: self
                            .members
                            .workers
                            .get(name)
                            .map(|w| w.id.clone())
                            .unwrap_or_default(),
                        index: k as u32,
                        samples: p.work(k).len() as u64,
                    })
                    .collect()
            })
            .unwrap_or_default();
        sh.clear_round();
        sh.told = expected.clone();
        let commit = std::mem::take(&mut sh.commit);
        if members.is_empty() && !commit {
            return;
        }
        tracing::trace!(target: "capsnet::timeline", round, commit, "open");
        sh.all(Order::Open(pb::OpenRound {
            round,
            members,
            expected: expected.iter().map(|&k| k as u32).collect(),
            commit,
        }));
    }

    /// Closes the round in two phases: every reducer reduces over the members complete
    /// everywhere and says whether its result is finite ([`Actor::finish_close`]).
    pub(super) fn close_sharded(&mut self) {
        let round = self.round;
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let members = sh.completed();
        if members.is_empty() {
            return;
        }
        tracing::trace!(target: "capsnet::timeline", round, "close");
        sh.all(Order::Close(pb::MemberSet {
            round,
            members: members.iter().map(|&k| k as u32).collect(),
        }));
        sh.closing = Some(Closing {
            round,
            answers: vec![None; sh.layout.len()],
            members,
            since: Instant::now(),
        });
    }

    /// Every reducer answered the close: commit (the next `Open` tells them) or discard.
    fn finish_close(&mut self) {
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let Some(cl) = sh.closing.take() else {
            return;
        };
        let Some(plan) = self.plan.take() else {
            return;
        };
        let finite = cl.answers.iter().all(|a| *a == Some(true));
        if !finite {
            sh.all(Order::Discard(pb::RoundRef { round: cl.round }));
            self.discard_round(plan, &cl.members);
            return;
        }
        // The members' losses as the first reducer got them (every reducer got the same).
        let samples: u64 = cl.members.iter().map(|&k| plan.work(k).len() as u64).sum();
        let loss = cl
            .members
            .iter()
            .map(|&k| {
                let l = sh
                    .reports
                    .get(&k)
                    .and_then(|r| r.first().copied().flatten())
                    .map_or(0.0, |(_, l)| l);
                l * plan.work(k).len() as f64
            })
            .sum::<f64>()
            / samples.max(1) as f64;
        sh.commit = true;
        if self.cfg.sync_mode == SyncMode::Grad {
            self.adam.step += 1;
        }
        self.after_close(plan, cl.members, samples, loss, cl.since, None);
    }

    /// Gathers the state after the last committed round from the reducers; `then` runs once
    /// it is whole.
    pub(super) fn gather(&mut self, then: AfterGather) {
        let (round, position, step) = (self.round, self.position(), self.adam.step);
        let n = self.params.data.len();
        let grad = self.cfg.sync_mode == SyncMode::Grad;
        let outer = self.cfg.outer.is_some();
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        if let Some(g) = sh.gathering.as_mut() {
            g.then.eval |= then.eval;
            g.then.checkpoint |= then.checkpoint;
            g.then.finish |= then.finish;
            g.then.relayout |= then.relayout;
            return;
        }
        sh.all(Order::Gather(pb::RoundRef { round }));
        sh.gathered_at = Instant::now();
        sh.gathering = Some(Gathering {
            round,
            position,
            step,
            since: Instant::now(),
            got: vec![0; sh.layout.len()],
            params: vec![0.0; n],
            m: if grad || outer { vec![0.0; n] } else { vec![] },
            v: if grad { vec![0.0; n] } else { vec![] },
            then,
        });
    }

    /// The gathered state becomes the actor's (and what a rollback returns to); then the
    /// evaluation, checkpoint or end of the run that waited for it.
    fn finish_gather(&mut self) {
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let Some(g) = sh.gathering.take() else {
            return;
        };
        // The pieces came in grid order.
        let grid = self.reducer.grid();
        let back = |w: &[f32]| to_vector_order(w, &grid, &self.place);
        self.params.data = back(&g.params);
        if self.cfg.sync_mode == SyncMode::Grad {
            self.adam.m = back(&g.m);
            self.adam.v = back(&g.v);
        } else if self.cfg.outer.is_some() {
            self.outer_m = back(&g.m);
        }
        sh.known_good = (g.round, g.position, g.step);
        tracing::debug!(round = g.round, "state gathered from the reducers");
        if g.then.finish {
            self.finish();
            return;
        }
        if g.then.eval {
            self.spawn_eval();
        }
        if g.then.checkpoint {
            let _ = self.checkpoint_now(false);
        }
        if g.then.relayout && !self.finished {
            self.relayout("a spare takes a span");
        }
    }

    /// Tells every reducer that training is over.
    pub(super) fn finish_reducers(&self) {
        if let Some(sh) = &self.shards {
            let round = self.round;
            for (l, _, _) in &sh.layout {
                l.send(Order::Finish(pb::RoundRef { round }));
            }
            for l in &sh.spares {
                l.send(Order::Finish(pb::RoundRef { round }));
            }
        }
    }

    /// A reducer the run cannot wait for is dropped as if its session had ended (it may
    /// still be connected): one that did not answer a close, or send its state for a gather,
    /// within `--round-timeout`; and, once an open round is past that deadline without the
    /// `--min-workers` updates it needs to close, one that has not received a member's update
    /// that every other reducer received (the workers cannot reach it).
    pub(super) fn check_reducers(&mut self, now: Instant) {
        if let Some(sh) = self.shards.as_mut() {
            // A spare whose wait is over takes a span if the layout has room for it.
            // The wait's length stays recorded: the next drop there doubles it.
            let mut over = vec![];
            for (a, w) in &mut sh.quarantine {
                if w.until.is_some_and(|u| u <= now) {
                    w.until = None;
                    over.push(a.clone());
                }
            }
            let room = sh.layout_id > 0
                && sh.layout.len() < sh.want
                && sh.spares.iter().any(|l| over.contains(&l.address));
            if room && !self.finished {
                tracing::info!(reducers = ?over, "a spare's wait is over");
                self.take_spare("a spare's wait was over");
            }
        }
        let timeout = self.cfg.round_timeout;
        let grid = self.reducer.grid();
        let stuck = self.plan.is_some()
            && now - self.round_started >= timeout
            && self
                .shards
                .as_ref()
                .is_some_and(|sh| sh.accepted.len() < self.cfg.min_workers);
        let Some(sh) = self.shards.as_mut() else {
            return;
        };
        let mut late: Vec<(u64, &'static str)> = vec![];
        if let Some(cl) = sh.closing.as_ref().filter(|cl| now - cl.since >= timeout) {
            for ((l, _, _), a) in sh.layout.iter().zip(&cl.answers) {
                if a.is_none() {
                    late.push((l.session, "did not answer the round's close in time"));
                }
            }
        }
        if let Some(g) = sh.gathering.as_ref().filter(|g| now - g.since >= timeout) {
            for ((l, s, _), got) in sh.layout.iter().zip(&g.got) {
                let want: usize = grid[s.clone()].iter().map(|r| r.len()).sum();
                if *got != want {
                    late.push((l.session, "did not send its state in time"));
                }
            }
        }
        if stuck && sh.closing.is_none() && sh.ready() && sh.layout.len() > 1 {
            for slot in sh.reports.values() {
                let missing: Vec<usize> = (0..slot.len()).filter(|&j| slot[j].is_none()).collect();
                if let [j] = missing[..]
                    && slot.len() > 1
                {
                    let s = sh.layout[j].0.session;
                    if !late.iter().any(|(x, _)| *x == s) {
                        late.push((s, "missed an update every other reducer received"));
                    }
                }
            }
        }
        for (s, why) in late {
            tracing::warn!(session = s, "a reducer {why}: dropping it");
            self.reducer_lost(s);
        }
    }
}
