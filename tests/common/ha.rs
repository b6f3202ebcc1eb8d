//! A local PostgreSQL cluster under pg_auto_failover for the failover
//! tests, driven through `deploy/ha/pg-cluster.sh` (one monitor, three data
//! nodes on ports of their own, stopped and removed when this drops), and
//! the faults the tests inject into it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A running cluster; stopped (and its directory removed) on drop.
pub struct PgCluster {
    pub base: u16,
    pub dir: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/ha/pg-cluster.sh")
}

/// Four free consecutive ports from a random start (monitor and 3 nodes).
fn free_base() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (uuid::Uuid::new_v4().as_u128() % 20_000) as u16;
        let free = (base..base + 4).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no four free consecutive ports for a test cluster");
}

impl PgCluster {
    /// Starts a cluster (about half a minute), or fails the test loudly
    /// when pg_auto_failover is not installed.
    pub fn start() -> Self {
        assert!(
            std::path::Path::new("/usr/bin/pg_autoctl").exists(),
            "the failover tests need pg_auto_failover: apt-get install postgresql-15-auto-failover \
             pg-auto-failover-cli (.ci/run installs them)"
        );
        let base = free_base();
        let dir = std::env::temp_dir().join(format!("wallet-ha-test-{}", uuid::Uuid::new_v4().simple()));
        let cluster = Self { base, dir };
        let out = cluster.run(&["start"]);
        assert!(out.status.success(), "starting the cluster failed:\n{}", text(&out));
        cluster
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let base = self.base.to_string();
        let dir = self.dir.display().to_string();
        Command::new("bash")
            .arg(script())
            .args(args)
            .args(["--dir", &dir, "--port", &base])
            .output()
            .expect("run deploy/ha/pg-cluster.sh")
    }

    fn stdout(&self, args: &[&str]) -> Option<String> {
        let out = self.run(args);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `postgres://postgres@127.0.0.1:P1,...,P3/wallet`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = (1..=3).map(|n| format!("127.0.0.1:{}", self.port(n))).collect();
        format!("postgres://postgres@{}/wallet", hosts.join(","))
    }

    /// A URL of one node (for reading the log directly).
    pub fn node_url(&self, node: u8) -> String {
        format!("postgres://postgres@127.0.0.1:{}/wallet", self.port(node))
    }

    pub fn port(&self, node: u8) -> u16 {
        self.base + u16::from(node)
    }

    /// The node (1-3) that is primary now, if one answers as primary.
    pub fn primary(&self) -> Option<u8> {
        let port: u16 = self.stdout(&["primary"])?.lines().next()?.trim().parse().ok()?;
        Some((port - self.base) as u8)
    }

    /// Waits for a primary and two healthy secondaries, as at start.
    pub fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.run(&["healthy"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not recover within {limit:?}:\n{}\n{}",
                text(&out),
                self.stdout(&["status"]).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every process of a node (keeper and postgres), for a signal.
    fn pids(&self, node: u8) -> Vec<i32> {
        let out = self.stdout(&["procs", &node.to_string()]).unwrap_or_default();
        out.split_whitespace().filter_map(|w| w.parse().ok()).collect()
    }

    /// The postmaster of a node only.
    fn postmaster(&self, node: u8) -> Option<i32> {
        self.stdout(&["postmaster", &node.to_string()])?.trim().parse().ok()
    }

    fn signal(&self, pids: &[i32], signal: i32) {
        for pid in pids {
            // SAFETY: kill(2) with a pid we just read; a gone pid is ESRCH.
            unsafe {
                libc::kill(*pid, signal);
            }
        }
    }

    /// The machine is lost: SIGKILL the keeper and postgres of `node`.
    pub fn kill_node(&self, node: u8) {
        let pids = self.pids(node);
        assert!(!pids.is_empty(), "no processes of node {node}");
        self.signal(&pids, libc::SIGKILL);
    }

    /// Only PostgreSQL crashes: SIGKILL the postmaster (its keeper lives
    /// and restarts it).
    pub fn kill_postmaster(&self, node: u8) {
        let pm = self.postmaster(node).expect("the node's postmaster");
        self.signal(&[pm], libc::SIGKILL);
    }

    /// Freezes every process of `node` (as a hung machine would be).
    pub fn freeze(&self, node: u8) -> Vec<i32> {
        let pids = self.pids(node);
        assert!(!pids.is_empty(), "no processes of node {node}");
        self.signal(&pids, libc::SIGSTOP);
        pids
    }

    /// Freezes the WAL senders of `node` (the primary's): replication
    /// stops at the primary, with every node still healthy, and what it
    /// commits from now on reaches no standby, not even a socket buffer.
    pub fn freeze_walsenders(&self, node: u8) -> Vec<i32> {
        let out = self.stdout(&["walsenders", &node.to_string()]).unwrap_or_default();
        let pids: Vec<i32> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert!(!pids.is_empty(), "no WAL senders on node {node}");
        self.signal(&pids, libc::SIGSTOP);
        pids
    }

    pub fn thaw(&self, pids: &[i32]) {
        self.signal(pids, libc::SIGCONT);
    }

    /// Starts a killed node's keeper again: it rejoins as a standby.
    pub fn restart_node(&self, node: u8) {
        let out = self.run(&["restart", &node.to_string()]);
        assert!(out.status.success(), "restarting node {node} failed:\n{}", text(&out));
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let out = self.run(&["stop"]);
        if !out.status.success() {
            eprintln!("stopping the test cluster failed:\n{}", text(&out));
        }
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A local three-node RabbitMQ cluster (`deploy/ha/rabbit-cluster.sh`,
/// node names and ports of its own), stopped and removed on drop.
pub struct RabbitCluster {
    pub base: u16,
    pub dir: PathBuf,
}

fn rabbit_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/ha/rabbit-cluster.sh")
}

impl RabbitCluster {
    /// Starts three nodes and joins them (about 25 s).
    pub fn start() -> Self {
        // AMQP on base..base+2 and distribution on base+20000..: both free.
        let base = (0..200)
            .map(|_| 10_000 + (uuid::Uuid::new_v4().as_u128() % 20_000) as u16)
            .find(|b| {
                (*b..b + 3)
                    .chain(b + 20_000..b + 20_003)
                    .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            })
            .expect("free ports for a RabbitMQ test cluster");
        let dir = std::env::temp_dir().join(format!("wallet-ha-rabbit-test-{}", uuid::Uuid::new_v4().simple()));
        let cluster = Self { base, dir };
        let name = format!("wallet-test-{base}");
        let out = cluster.run(&["start", "--name", &name]);
        assert!(
            out.status.success(),
            "starting the RabbitMQ cluster failed:\n{}",
            text(&out)
        );
        cluster
    }

    /// `rabbit-cluster.sh CMD --dir D --port P REST...` (for `ctl`, what
    /// follows the node number goes to rabbitmqctl).
    fn run(&self, args: &[&str]) -> std::process::Output {
        let base = self.base.to_string();
        let dir = self.dir.display().to_string();
        Command::new("bash")
            .arg(rabbit_script())
            .arg(args[0])
            .args(["--dir", &dir, "--port", &base])
            .args(&args[1..])
            // A frozen node is declared down within ~10 s, not a minute.
            .env("RABBIT_HA_NET_TICKTIME", "10")
            .output()
            .expect("run deploy/ha/rabbit-cluster.sh")
    }

    /// The three nodes' AMQP URLs, comma-separated (as `AMQP_URL` takes them).
    pub fn urls(&self) -> String {
        (0..3)
            .map(|i| format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.base + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node (1-3) leading `queue`, as node 1..3 sees it.
    pub fn leader_of(&self, queue: &str) -> Option<u8> {
        for asked in 1..=3u8 {
            let out = self.run(&["ctl", &asked.to_string(), "-q", "list_queues", "name", "leader"]);
            if !out.status.success() {
                continue;
            }
            let listing = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = listing.lines().find(|l| l.split_whitespace().next() == Some(queue))?;
            let leader = line.split_whitespace().nth(1)?;
            // wallet-test-<base>-<N>@localhost
            return leader.split('@').next()?.rsplit('-').next()?.parse().ok();
        }
        None
    }

    /// SIGKILLs node `n` (its Erlang VM).
    pub fn kill(&self, n: u8) {
        let out = self.run(&["kill", &n.to_string()]);
        assert!(
            out.status.success(),
            "killing RabbitMQ node {n} failed:\n{}",
            text(&out)
        );
    }

    /// Starts node `n` again; it rejoins the cluster.
    pub fn restart(&self, n: u8) {
        let out = self.run(&["restart", &n.to_string()]);
        assert!(
            out.status.success(),
            "restarting RabbitMQ node {n} failed:\n{}",
            text(&out)
        );
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let out = self.run(&["stop"]);
        if !out.status.success() {
            eprintln!("stopping the RabbitMQ test cluster failed:\n{}", text(&out));
        }
    }
}
