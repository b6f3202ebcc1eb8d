//! A PostgreSQL cluster as the service sees it: the hosts of a libpq-style
//! URL (`postgres://user@h1:p1,h2:p2,h3:p3/db`), which of them is the
//! primary, and how much of a quorum it commits to.
//!
//! sqlx takes one host and ignores `target_session_attrs`, so the service
//! finds the primary itself: it asks every host at once and keeps one that
//! is not in recovery. Two can claim it for a moment (a primary frozen
//! through its failover and then resumed still believes it leads): the one
//! on the newest timeline wins, because a promotion starts a timeline.

use std::str::FromStr as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection as _;
use tokio::sync::Notify;

use super::StoreError;

/// The hosts of one database URL, in the order given.
#[derive(Debug, Clone)]
pub struct Cluster {
    hosts: Vec<PgConnectOptions>,
}

/// What one host said when asked for its role.
#[derive(Debug)]
enum Role {
    /// Not in recovery, on this timeline.
    Primary(u32),
    Standby,
    /// Out of recovery but refusing writes (being promoted or demoted).
    ReadOnly,
    Unreachable(String),
}

impl Cluster {
    /// Parses `postgres://[userinfo@]host[:port][,host[:port]...][/db][?params]`.
    /// Each host gets the same user, database and parameters.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let hosts = split_hosts(url)?
            .iter()
            .map(|u| PgConnectOptions::from_str(u).map_err(|e| StoreError::BadUrl(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { hosts })
    }

    /// A cluster of one host.
    pub fn of(host: PgConnectOptions) -> Self {
        Self { hosts: vec![host] }
    }

    pub fn hosts(&self) -> &[PgConnectOptions] {
        &self.hosts
    }

    /// One host: nothing to discover (the service connects as before).
    pub fn is_single(&self) -> bool {
        self.hosts.len() == 1
    }

    /// The first host's options (a single-host cluster's only one).
    pub fn first(&self) -> &PgConnectOptions {
        &self.hosts[0]
    }

    /// `h1:p1,h2:p2` for messages (never the password).
    pub fn describe(&self) -> String {
        self.hosts.iter().map(address).collect::<Vec<_>>().join(",")
    }

    /// The primary's options. One host is taken as it is; of several, every
    /// host is asked within `timeout` and the primary on the newest timeline
    /// is kept (the first listed among equals).
    pub async fn primary(&self, timeout: Duration) -> Result<PgConnectOptions, StoreError> {
        if self.is_single() {
            return Ok(self.hosts[0].clone());
        }
        Ok(self.leader(timeout).await?.0)
    }

    /// `primary` of several hosts, with the timeline it writes.
    async fn leader(&self, timeout: Duration) -> Result<(PgConnectOptions, u32), StoreError> {
        let asked = self.ask_all(timeout).await;
        let newest = asked
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Role::Primary(timeline) => Some((*timeline, std::cmp::Reverse(i))),
                _ => None,
            })
            .max();
        match newest {
            Some((timeline, std::cmp::Reverse(i))) => Ok((self.hosts[i].clone(), timeline)),
            None => Err(StoreError::NoPrimary(self.roles_text(&asked))),
        }
    }

    /// Every host's role, asked at once. Once one answers as primary the
    /// others get `PRIMARY_GRACE` more (another may be on a newer
    /// timeline), so a frozen host, which accepts the connection and never
    /// answers, costs a discovery that grace and not the whole `timeout`.
    async fn ask_all(&self, timeout: Duration) -> Vec<Role> {
        use futures_util::StreamExt as _;
        let mut pending: futures_util::stream::FuturesUnordered<_> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| async move { (i, role(h, timeout).await) })
            .collect();
        let mut asked: Vec<Role> = self
            .hosts
            .iter()
            .map(|_| Role::Unreachable("not asked".to_owned()))
            .collect();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace {
                Some(until) => match tokio::time::timeout_at(until, pending.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => pending.next().await,
            };
            let Some((i, role)) = next else { break };
            if matches!(role, Role::Primary(_)) && grace.is_none() {
                grace = Some(tokio::time::Instant::now() + PRIMARY_GRACE);
            }
            asked[i] = role;
        }
        for (i, role) in asked.iter_mut().enumerate() {
            if matches!(role, Role::Unreachable(why) if why == "not asked") {
                *role = Role::Unreachable(format!(
                    "no answer within {PRIMARY_GRACE:?} of host {} answering as primary",
                    i + 1
                ));
            }
        }
        asked
    }

    fn roles_text(&self, asked: &[Role]) -> String {
        self.hosts
            .iter()
            .zip(asked)
            .map(|(h, r)| match r {
                Role::Primary(t) => format!("{} primary (timeline {t})", address(h)),
                Role::Standby => format!("{} standby", address(h)),
                Role::ReadOnly => format!("{} read-only", address(h)),
                Role::Unreachable(why) => format!("{} unreachable: {why}", address(h)),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// `host:port` of one host's options.
pub fn address(o: &PgConnectOptions) -> String {
    format!("{}:{}", o.get_host(), o.get_port())
}

/// Asks one host whether it is in recovery and, if not, its timeline.
async fn role(host: &PgConnectOptions, timeout: Duration) -> Role {
    let ask = async {
        let mut conn = PgConnection::connect_with(host).await?;
        let role = role_of(&mut conn).await;
        let _ = conn.close().await;
        role
    };
    match tokio::time::timeout(timeout, ask).await {
        Err(_) => Role::Unreachable(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Role::Unreachable(e.to_string()),
        Ok(Ok(role)) => role,
    }
}

/// The role of the server behind one connection.
async fn role_of(conn: &mut PgConnection) -> Result<Role, sqlx::Error> {
    // pg_walfile_name fails during recovery, hence the CASE; its first
    // eight hex digits are the timeline being written. A node just
    // promoted by pg_auto_failover is read-only until the old primary is
    // known to be demoted: not a primary yet.
    let (standby, read_only, timeline): (bool, bool, Option<String>) = sqlx::query_as(
        "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on', \
         CASE WHEN pg_is_in_recovery() THEN NULL \
         ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
    )
    .fetch_one(conn)
    .await?;
    Ok(match (standby, read_only) {
        (true, _) => Role::Standby,
        (false, true) => Role::ReadOnly,
        (false, false) => Role::Primary(timeline.and_then(|t| u32::from_str_radix(&t, 16).ok()).unwrap_or(0)),
    })
}

/// After one host answers as primary, how long the others have to answer.
const PRIMARY_GRACE: Duration = Duration::from_millis(300);

/// How often a pool on a host list checks that its host is still the primary.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// The check, and each host's answer when looking for the primary.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(2);

/// When a pool last moved to a new primary: connections it opened before
/// are closed instead of handed out (they lead to the old one), and one
/// that reaches a primary on an older timeline than the pool has seen is
/// refused (it was started towards the old one and finished after the move).
#[derive(Debug)]
struct Moves {
    epoch: Instant,
    last_ms: AtomicU64,
    /// The newest timeline a primary of this pool was seen on.
    timeline: AtomicU32,
    /// A connection found a standby: look for the primary now.
    wake: Notify,
}

impl Moves {
    fn moved(&self, timeline: u32) {
        self.timeline.fetch_max(timeline, Ordering::AcqRel);
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Whether a primary on `timeline` may serve this pool: not when a
    /// newer one was seen (the error names it). Remembers the newest.
    fn admits(&self, timeline: u32) -> Result<(), u32> {
        let newest = self.timeline.fetch_max(timeline, Ordering::AcqRel);
        if timeline >= newest {
            Ok(())
        } else {
            Err(newest)
        }
    }

    /// Whether a connection of this age was opened after the last move.
    fn opened_since_move(&self, age: Duration) -> bool {
        let since = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Acquire)));
        age <= since
    }
}

/// A pool on the primary of a host list that follows it: a new connection
/// that finds a standby is refused (and wakes the follower), and a
/// background task checks every second that the host still leads, finds the
/// new primary when it does not, points new connections there and retires
/// the old ones. So a demoted primary is never written through the pool.
pub(crate) async fn following_pool(
    options: PgPoolOptions,
    primary: PgConnectOptions,
    cluster: Arc<Cluster>,
) -> Result<PgPool, sqlx::Error> {
    let moves = Arc::new(Moves {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
        timeline: AtomicU32::new(0),
        wake: Notify::new(),
    });
    let (on_connect, on_acquire) = (moves.clone(), moves.clone());
    let pool = options
        .after_connect(move |conn, _| {
            let moves = on_connect.clone();
            Box::pin(async move {
                let refusal = match role_of(conn).await? {
                    Role::Primary(timeline) => match moves.admits(timeline) {
                        Ok(()) => return Ok(()),
                        Err(newest) => format!("connected to a primary on timeline {timeline}, older than {newest}"),
                    },
                    _ => "connected to a standby, not the primary".to_owned(),
                };
                moves.wake.notify_one();
                Err(sqlx::Error::Protocol(refusal))
            })
        })
        .before_acquire(move |_, meta| {
            let current = on_acquire.opened_since_move(meta.age);
            Box::pin(async move { Ok(current) })
        })
        .connect_with(primary)
        .await?;
    tokio::spawn(follow(pool.clone(), cluster, moves));
    Ok(pool)
}

/// The follower of one pool, until the pool closes.
async fn follow(pool: PgPool, cluster: Arc<Cluster>, moves: Arc<Moves>) {
    let mut current = address(&pool.connect_options());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = moves.wake.notified() => {}
        }
        if pool.is_closed() {
            return;
        }
        let check = sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()").fetch_one(&pool);
        if matches!(tokio::time::timeout(FOLLOW_TIMEOUT, check).await, Ok(Ok(false))) {
            continue;
        }
        match cluster.leader(FOLLOW_TIMEOUT).await {
            Ok((primary, timeline)) if address(&primary) != current => {
                let found = address(&primary);
                tracing::warn!(from = %current, to = %found, timeline, "following the new primary");
                moves.moved(timeline);
                pool.set_connect_options(primary);
                current = found;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "no primary to follow yet"),
        }
    }
}

/// One single-host URL per host of a libpq-style multi-host URL.
fn split_hosts(url: &str) -> Result<Vec<String>, StoreError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| StoreError::BadUrl("expected postgres://...".to_owned()))?;
    // The authority ends at the path or the query; userinfo cannot hold an
    // unescaped '/' or '?'.
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let tail = without_session_attrs(tail);
    let list: Vec<&str> = hosts.split(',').collect();
    if list.len() > 1 && list.iter().any(|h| h.is_empty()) {
        return Err(StoreError::BadUrl(format!("an empty host in the host list {hosts:?}")));
    }
    Ok(list
        .into_iter()
        .map(|h| format!("{scheme}://{userinfo}{h}{tail}"))
        .collect())
}

/// Drops `target_session_attrs` (the service finds the primary itself;
/// sqlx would only warn that it ignores it).
fn without_session_attrs(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("target_session_attrs="))
        .collect();
    match kept.is_empty() {
        true => path.to_owned(),
        false => format!("{path}?{}", kept.join("&")),
    }
}

/// How many standbys `synchronous_standby_names` makes a commit wait for
/// (`ANY n (...)`, `FIRST n (...)`, `n (...)`, or a plain list: one).
pub fn sync_standbys_required(setting: &str) -> u32 {
    let s = setting.trim();
    if s.is_empty() {
        return 0;
    }
    let words = s
        .strip_prefix("ANY ")
        .or_else(|| s.strip_prefix("any "))
        .or_else(|| s.strip_prefix("FIRST "))
        .or_else(|| s.strip_prefix("first "))
        .unwrap_or(s)
        .trim_start();
    match words.split_once('(') {
        Some((n, _)) => n.trim().parse().unwrap_or(0),
        // A plain list: the first one that is connected is synchronous.
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_becomes_one_url_per_host() {
        let urls = split_hosts("postgres://u:p@h1:1,h2:2,h3/db?sslmode=disable&target_session_attrs=read-write")
            .expect("parses");
        assert_eq!(
            urls,
            vec![
                "postgres://u:p@h1:1/db?sslmode=disable",
                "postgres://u:p@h2:2/db?sslmode=disable",
                "postgres://u:p@h3/db?sslmode=disable",
            ]
        );
        let c = Cluster::parse("postgres://postgres@127.0.0.1:6501,127.0.0.1:6502/wallet").expect("parses");
        assert_eq!(c.describe(), "127.0.0.1:6501,127.0.0.1:6502");
        assert!(!c.is_single());
        assert!(Cluster::parse("postgres://postgres@127.0.0.1:5432/x")
            .expect("parses")
            .is_single());
        assert!(split_hosts("postgres://u@h1,,h2/db").is_err());
    }

    #[test]
    fn a_primary_on_an_older_timeline_is_refused_once_a_newer_one_was_seen() {
        let moves = Moves {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            timeline: AtomicU32::new(0),
            wake: Notify::new(),
        };
        assert_eq!(moves.admits(3), Ok(()));
        // The follower moved to the promoted standby's new timeline.
        moves.moved(4);
        assert_eq!(moves.admits(3), Err(4), "the old primary, resumed after the move");
        assert_eq!(moves.admits(4), Ok(()));
        assert_eq!(moves.admits(5), Ok(()));
        assert_eq!(moves.admits(4), Err(5));
    }

    #[test]
    fn the_standbys_a_commit_waits_for() {
        assert_eq!(sync_standbys_required(""), 0);
        assert_eq!(
            sync_standbys_required("ANY 1 (pgautofailover_standby_2, pgautofailover_standby_3)"),
            1
        );
        assert_eq!(sync_standbys_required("FIRST 2 (a, b, c)"), 2);
        assert_eq!(sync_standbys_required("2 (a, b)"), 2);
        assert_eq!(sync_standbys_required("a, b"), 1);
        assert_eq!(sync_standbys_required("*"), 1);
    }
}
