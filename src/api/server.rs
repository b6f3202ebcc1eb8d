//! The HTTP server loop: connection hygiene that `axum::serve` does not offer.
//!
//! - **Header deadline.** A connection must finish a request's headers
//!   within `header_read_timeout` of opening, or of the first byte of its
//!   next request; a silent or trickling (slowloris) client is closed.
//! - **Idle deadline.** A keep-alive connection with no request in flight
//!   and no byte of a new one is closed after `idle_timeout`.
//! - **Connection cap.** At most `max_connections` are open. A new one
//!   beyond it takes the place of the connection that has been
//!   unproductive (idle or mid-headers, no request in flight) the longest;
//!   if every connection is busy it waits for one to finish, at most the
//!   header deadline, and is then closed.
//! - **Descriptors.** `raise_descriptor_limit` lifts the soft
//!   `RLIMIT_NOFILE` to the hard one; the default cap leaves a quarter of
//!   it (64 to 1,024) for the database pools, the broker and files.
//! - **Accept errors** (`EMFILE`...) free an idle connection and back off
//!   briefly instead of spinning.
//! - **Parser errors.** hyper's bare 400/414/431 for a request it cannot
//!   parse goes out as problem+json (`wire.rs`); heads are limited to
//!   `wire::MAX_HEAD_BYTES`.
//! - **Shutdown.** Stops accepting, lets in-flight requests finish (idle
//!   connections close at once), returns when every connection is closed.
//!
//! The watchdog knows a request is in flight from the service (a request
//! starts when its headers are parsed and ends when its response body is
//! dropped) and sees bytes arrive through a wrapper around the socket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tower::Service;

/// Default time a connection has to send a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time an idle keep-alive connection is kept open.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a failed accept (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
const NONE: u64 = u64::MAX;

/// How `serve` treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: default_max_connections(descriptor_limit().0),
        }
    }
}

/// The (soft, hard) limit on open descriptors; unlimited reads as `u64::MAX`.
pub fn descriptor_limit() -> (u64, u64) {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            return (limit.rlim_cur as u64, limit.rlim_max as u64);
        }
    }
    (1024, 1024)
}

/// Raises the soft descriptor limit to the hard one; returns the soft
/// limit in force afterwards.
pub fn raise_descriptor_limit() -> u64 {
    #[cfg(unix)]
    {
        let (soft, hard) = descriptor_limit();
        if soft < hard {
            let limit = libc::rlimit {
                rlim_cur: hard as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: setrlimit reads the struct we own.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
                tracing::warn!(soft, hard, "could not raise the descriptor limit");
            }
        }
    }
    descriptor_limit().0
}

/// Connections allowed under a soft descriptor limit: a quarter of it
/// (at least 64, at most 1,024) stays free for the database pools, the
/// broker, log files and the listener itself.
pub fn default_max_connections(soft_limit: u64) -> usize {
    let soft = soft_limit.min(1 << 20);
    let reserve = (soft / 4).clamp(64, 1024);
    soft.saturating_sub(reserve).max(8) as usize
}

/// Why the server closed a connection.
#[derive(Debug, Clone, Copy)]
enum Closed {
    HeaderTimeout,
    IdleTimeout,
    Evicted,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Evicted => "evicted",
        }
    }
}

/// One connection's state, shared by its socket wrapper, its service and
/// its watchdog. Times are milliseconds since `base`.
struct Activity {
    base: Instant,
    in_flight: AtomicU32,
    idle_since: AtomicU64,
    /// When the first byte of a request not yet started arrived (`NONE`:
    /// none has).
    reading_since: AtomicU64,
    evicted: AtomicBool,
    wake: Notify,
}

impl Activity {
    fn new(base: Instant) -> Self {
        let now = base.elapsed().as_millis() as u64;
        // A new connection is reading its first request from the start.
        Self {
            base,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(now),
            reading_since: AtomicU64::new(now),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .reading_since
                .compare_exchange(NONE, self.now(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.wake.notify_one();
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.reading_since.store(NONE, Ordering::Release);
    }

    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.now(), Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// Since when the connection has produced no request, if it has none in flight.
    fn unproductive_since(&self) -> Option<u64> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.reading_since.load(Ordering::Acquire) {
            NONE => Some(self.idle_since.load(Ordering::Acquire)),
            t => Some(t),
        }
    }

    /// Resolves when the connection must be closed.
    async fn watchdog(&self, options: &ServeOptions) -> Closed {
        loop {
            if self.evicted.load(Ordering::Acquire) {
                return Closed::Evicted;
            }
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                None
            } else {
                match self.reading_since.load(Ordering::Acquire) {
                    NONE => Some((
                        self.idle_since.load(Ordering::Acquire) + options.idle_timeout.as_millis() as u64,
                        Closed::IdleTimeout,
                    )),
                    t => Some((
                        t + options.header_read_timeout.as_millis() as u64,
                        Closed::HeaderTimeout,
                    )),
                }
            };
            match deadline {
                Some((at, why)) if at <= self.now() => return why,
                Some((at, _)) => {
                    let sleep = tokio::time::sleep_until((self.base + Duration::from_millis(at)).into());
                    tokio::select! {
                        _ = sleep => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

/// The open connections, for eviction at the cap.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    fn add(self: &Arc<Self>, activity: Arc<Activity>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, activity);
        metrics::gauge!("http_connections_open").increment(1.0);
        Registered {
            registry: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the connection unproductive the longest; false if all are busy.
    fn evict_one(&self) -> bool {
        let open = self.lock();
        let oldest = open
            .values()
            .filter(|a| !a.evicted.load(Ordering::Acquire))
            .filter_map(|a| a.unproductive_since().map(|t| (t, a)))
            .min_by_key(|(t, _)| *t);
        match oldest {
            Some((_, activity)) => {
                activity.evicted.store(true, Ordering::Release);
                activity.wake.notify_one();
                metrics::counter!("http_connections_closed_total", "reason" => Closed::Evicted.label()).increment(1);
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from the registry when its task ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        metrics::gauge!("http_connections_open").decrement(1.0);
    }
}

/// The socket, noting when bytes arrive.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
    /// Rewrites hyper's bare answer to an unparseable request (`wire.rs`).
    writer: super::wire::Writer,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.writer.poll_write(&mut this.stream, cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.writer.poll_flush(&mut this.stream, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.writer.poll_shutdown(&mut this.stream, cx)
    }
}

/// A response body that ends its request when dropped (fully sent or not).
struct ResponseBody {
    inner: Body,
    _ends: RequestEnds,
}

struct RequestEnds(Arc<Activity>);

impl Drop for RequestEnds {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops
/// accepting and returns once every connection has closed.
pub async fn run(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let max = options
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let slots = Arc::new(Semaphore::new(max));
    let registry = Arc::new(Registry::default());
    let base = Instant::now();
    let mut stopped = stopping.clone();
    loop {
        let (stream, addr) = tokio::select! {
            _ = stop_requested(&mut stopped) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e, &registry).await;
                    continue;
                }
            },
        };
        let Some(slot) = take_slot(&slots, &registry, options.header_read_timeout).await else {
            metrics::counter!("http_connections_refused_total").increment(1);
            tracing::warn!(%addr, "connection refused: every connection is busy");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new(base));
        let registered = registry.add(activity.clone());
        let (router, stopping) = (router.clone(), stopping.clone());
        tokio::spawn(async move {
            connection(stream, addr, router, activity, options, stopping).await;
            drop((registered, slot));
        });
    }
    drop(listener);
    // Every connection holds a slot: all of them back means all closed.
    let _all = slots.acquire_many(max as u32).await;
    Ok(())
}

/// Resolves once the server is told to stop (holds no guard across awaits).
async fn stop_requested(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// A connection slot: at once, or after evicting an unproductive
/// connection, or when a busy one finishes (within `wait`).
async fn take_slot(
    slots: &Arc<Semaphore>,
    registry: &Registry,
    wait: Duration,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    registry.evict_one();
    tokio::time::timeout(wait, slots.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
}

async fn accept_failed(e: &std::io::Error, registry: &Registry) {
    metrics::counter!("http_accept_errors_total").increment(1);
    tracing::warn!(error = %e, "accept failed; freeing an idle connection and backing off");
    registry.evict_one();
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Serves one connection until it ends, its watchdog closes it, or the
/// server stops (then in-flight requests finish first).
async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    router: Router,
    activity: Arc<Activity>,
    options: ServeOptions,
    mut stopping: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Tracked {
        stream,
        activity: activity.clone(),
        writer: Default::default(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            activity.request_started();
            let ends = RequestEnds(activity.clone());
            request.extensions_mut().insert(ConnectInfo(addr));
            let handled = router.clone().call(request.map(Body::new));
            async move {
                let response = handled.await.unwrap_or_else(|never: Infallible| match never {});
                Ok::<_, Infallible>(response.map(|inner| ResponseBody { inner, _ends: ends }))
            }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's own header clock also runs between requests: a backstop
    // behind the watchdog's deadlines.
    http.timer(TokioTimer::new())
        .header_read_timeout(options.idle_timeout.max(options.header_read_timeout) + options.header_read_timeout)
        // One contiguous write per answer, so `wire.rs` sees hyper's own
        // answer whole; and a head limit of our choosing.
        .writev(false)
        .max_buf_size(super::wire::MAX_HEAD_BYTES);
    let served = http.serve_connection(io, service);
    tokio::pin!(served);
    let watchdog = activity.watchdog(&options);
    tokio::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %addr, "connection ended with an error");
                }
                return;
            }
            why = watchdog.as_mut() => {
                if !matches!(why, Closed::Evicted) {
                    // (evictions are counted where they are decided)
                    metrics::counter!("http_connections_closed_total", "reason" => why.label()).increment(1);
                }
                tracing::debug!(%addr, reason = why.label(), "closing connection");
                return;
            }
            _ = stop_requested(&mut stopping), if !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_for_the_pools() {
        assert_eq!(default_max_connections(256), 192);
        assert_eq!(default_max_connections(1024), 768);
        assert_eq!(default_max_connections(65_536), 64_512);
        assert_eq!(default_max_connections(40), 8);
        assert!(default_max_connections(u64::MAX) <= 1 << 20);
    }

    #[tokio::test]
    async fn the_watchdog_waits_for_requests_in_flight() {
        let options = ServeOptions {
            header_read_timeout: Duration::from_millis(50),
            idle_timeout: Duration::from_millis(100),
            max_connections: 1,
        };
        let activity = Activity::new(Instant::now());
        let started = Instant::now();
        assert!(matches!(activity.watchdog(&options).await, Closed::HeaderTimeout));
        assert!(started.elapsed() >= Duration::from_millis(50));
        activity.request_started();
        let waiting = tokio::time::timeout(Duration::from_millis(200), activity.watchdog(&options)).await;
        assert!(waiting.is_err(), "never closed with a request in flight");
        activity.request_ended();
        assert!(matches!(activity.watchdog(&options).await, Closed::IdleTimeout));
    }
}
