//! RabbitMQ test support: names of their own per test, an observer queue
//! bound to the fanout, and a TCP proxy that can cut connections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use wallet::broker::{EventMessage, Topology};

/// Where the tests find RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Fresh exchange and queue names; the broker drops the queues 10 minutes
/// after the test stops using them.
pub fn topology() -> Topology {
    let mut t = Topology::named(&format!("test.{}.events", uuid::Uuid::new_v4().simple()));
    t.queue_expiry = Some(Duration::from_secs(600));
    t
}

pub async fn connect(url: &str) -> Connection {
    wallet::broker::connect(url).await.unwrap_or_else(|e| {
        panic!("RabbitMQ is required for this test and is not reachable at {url}: {e}\nstart it (see README) or set TEST_AMQP_URL")
    })
}

/// A queue of the test's own bound to the fanout: sees every published message.
pub struct Observer {
    _connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    /// Each collected message's `traceparent` header, in order.
    pub traceparents: Vec<Option<String>>,
}

impl Observer {
    pub async fn bind(topology: &Topology) -> Self {
        Self::bind_plain(topology).await
    }

    /// Binds without declaring anything but the exchange, queues and the
    /// observer's own queue as `topology` says (with or without expiry).
    pub async fn bind_plain(topology: &Topology) -> Self {
        let connection = connect(&amqp_url()).await;
        let channel = connection.create_channel().await.unwrap();
        topology.declare(&channel).await.unwrap();
        let queue = format!("{}.observer", topology.exchange);
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongUInt(600_000));
        channel
            .queue_declare(
                &queue,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                &queue,
                &topology.exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                &queue,
                "observer",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            _connection: connection,
            channel,
            consumer,
            traceparents: Vec::new(),
        }
    }

    /// Deletes the queues and exchanges of a topology declared without expiry.
    pub async fn delete_topology(&self, topology: &Topology) {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let observer = format!("{}.observer", topology.exchange);
        for q in [&topology.worker_queue, &topology.dead_letter_queue, &observer] {
            let _ = self.channel.queue_delete(q, QueueDeleteOptions::default()).await;
        }
        for x in [&topology.exchange, &topology.dead_letter_exchange] {
            let _ = self.channel.exchange_delete(x, ExchangeDeleteOptions::default()).await;
        }
    }

    /// Messages (decoded bodies) until `done` says so or `timeout` passes.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[EventMessage]) -> bool,
    ) -> Vec<EventMessage> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&got) {
            let next = tokio::time::timeout_at(deadline, self.consumer.next()).await;
            let Ok(Some(delivery)) = next else {
                break;
            };
            let delivery = delivery.expect("observer delivery");
            let message: EventMessage = serde_json::from_slice(&delivery.data).expect("message body");
            assert_eq!(
                delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()),
                Some(message.id.to_string()),
                "message_id is the event id"
            );
            assert_eq!(delivery.properties.delivery_mode(), &Some(2), "persistent");
            let traceparent = delivery.properties.headers().as_ref().and_then(|h| {
                h.inner().get("traceparent").and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                })
            });
            self.traceparents.push(traceparent);
            self.channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
                .unwrap();
            got.push(message);
        }
        got
    }
}

/// Forwards local connections to `target`; `cut()` drops every open one.
/// It can also go silent without closing anything: `stall` holds every
/// byte in both directions (new connections are accepted and then hear
/// nothing), `hold_replies` holds what the server sends. Held bytes are
/// forwarded once the hold ends, unless the connection is cut first.
pub struct TcpProxy {
    pub port: u16,
    flags: Arc<Flags>,
    live: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Each open connection's own stall flag (`stall_open_connections`).
    open_stalls: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Flags {
    down: std::sync::atomic::AtomicBool,
    stall: std::sync::atomic::AtomicBool,
    hold_replies: std::sync::atomic::AtomicBool,
    /// Bytes that had to wait for a hold to end.
    held: std::sync::atomic::AtomicUsize,
}

impl TcpProxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let live: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let flags: Arc<Flags> = Arc::default();
        let open_stalls: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> = Arc::default();
        let target = target.to_owned();
        let accept = {
            let live = live.clone();
            let flags = flags.clone();
            let open_stalls = open_stalls.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if flags.down.load(std::sync::atomic::Ordering::SeqCst) {
                        continue; // dropped: the server is "unreachable"
                    }
                    let (target, flags) = (target.clone(), flags.clone());
                    let own_stall: Arc<std::sync::atomic::AtomicBool> = Arc::default();
                    open_stalls.lock().unwrap().push(own_stall.clone());
                    let pipe = tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(&target).await {
                            let (client_read, client_write) = client.into_split();
                            let (server_read, server_write) = server.into_split();
                            let up = forward(client_read, server_write, flags.clone(), own_stall.clone(), false);
                            let down = forward(server_read, client_write, flags, own_stall, true);
                            tokio::join!(up, down);
                        }
                    });
                    live.lock().unwrap().push(pipe);
                }
            })
        };
        Self {
            port,
            flags,
            live,
            open_stalls,
            accept,
        }
    }

    /// A half-open link: every connection open now goes silent for good
    /// (nothing forwarded either way, not even a close), while new
    /// connections get through.
    pub fn stall_open_connections(&self) {
        for stall in self.open_stalls.lock().unwrap().drain(..) {
            stall.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// While down, new connections are dropped at once and open ones cut.
    pub fn set_down(&self, down: bool) {
        self.flags.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// While stalled, nothing is forwarded either way and nothing is closed:
    /// a peer that went silent (a half-open link, a frozen host).
    pub fn set_stalled(&self, stalled: bool) {
        self.flags.stall.store(stalled, std::sync::atomic::Ordering::SeqCst);
    }

    /// While set, what the server sends is held back (its answers are lost
    /// if the connection is cut meanwhile).
    pub fn set_hold_replies(&self, hold: bool) {
        self.flags.hold_replies.store(hold, std::sync::atomic::Ordering::SeqCst);
    }

    /// Bytes that have had to wait for a stall or hold so far.
    pub fn held_bytes(&self) -> usize {
        self.flags.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops every proxied connection (new ones still get through).
    pub fn cut(&self) {
        for pipe in self.live.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

/// Copies one direction, waiting while the flags hold it (a close too).
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    flags: Arc<Flags>,
    own_stall: Arc<std::sync::atomic::AtomicBool>,
    reply: bool,
) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let held = || own_stall.load(SeqCst) || flags.stall.load(SeqCst) || (reply && flags.hold_replies.load(SeqCst));
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // A silent peer does not close either.
                while own_stall.load(SeqCst) || flags.stall.load(SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                break;
            }
            Ok(n) => n,
        };
        if held() {
            flags.held.fetch_add(n, SeqCst);
            while held() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The AMQP URL of the proxy.
pub fn via_proxy(proxy: &TcpProxy) -> String {
    amqp_url().replace("127.0.0.1:5672", &format!("127.0.0.1:{}", proxy.port))
}
