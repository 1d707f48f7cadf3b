//! The card-data segment, built for real: network namespaces joined by veth
//! pairs to a core router namespace that forwards between them, the shipped
//! host firewalls (`deploy/nftables/cardvault.nft` in `pci`,
//! `deploy/nftables/database.nft` in `db`, `deploy/nftables/edge.nft` in
//! `dmz`) loaded with this test's own addresses file, a private PostgreSQL
//! in `db`, the real `tokenizer` (TLS, client certificates from `tokenizer
//! dev-pki`, as an unprivileged user) in `pci`, and the real hosted-collection
//! edge (`tokenizer edge`: its own TLS certificate, the `collect` client
//! certificate to the vault's api listener) in `dmz`, and the test acquirer
//! (`e2e::acquirer`: HTTPS with a CA of its own, client certificate
//! required) in `acquirer`, the vault's one `[[upstream]]`. Every check is a
//! real connection made with curl from the namespace of the caller; one
//! card is collected end to end through the edge across both firewalls,
//! and one forwarded from the payment router through the vault to the
//! acquirer (the egress side: the tokenizer host opens connections to the
//! acquirers' address . port pairs, set `acquirers`, and nothing else
//! outside the segment).
//!
//! ```text
//!   internet 198.51.100.10 ┐            ┌ dmz      10.230.7.10  tokenizer edge (collect)
//!   checkout 10.230.1.10   ┤            ├ pci      10.230.4.5   tokenizer api/reveal/admin
//!   router   10.230.2.10   ┼── core ────┼ db       10.230.5.10  PostgreSQL :5432
//!   ops      10.230.3.10   ┘ (forwards) └ acquirer 10.230.8.10  test acquirer :9443
//! ```
//!
//! The core namespace filters nothing: what stops a packet is the firewall
//! of the host it is addressed to (or leaves from), as in the deployment.
//! The acquirer's namespace gets a firewall of its own that is not ours
//! (`ACQUIRER_ALLOWLIST`): acquirers admit their merchants' egress
//! addresses only, so the internet and the other zones reach it no more than
//! they would a real one; what the shipped rules hold (the edge, the
//! database host and the tokenizer host on any other port or address) is
//! proved by their own drop counters.
//! PostgreSQL runs in a namespace of its own (not in `pci`) so that the
//! tokenizer reaches it over the network, through both rulesets. No
//! namespace has a link to the machine's own network: traffic stays inside.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables), `curl`, `setpriv` and
//! `runuser` (util-linux), the PostgreSQL server binaries and the `postgres`
//! OS user; without them the test fails with what is missing (it never
//! skips). Namespaces are named `cv<pid>-<name>` and removed on drop, also
//! after a panic.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::fd::AsFd as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use e2e::acquirer::{Acquirer, AcquirerOptions, Response};
use e2e::{current_year_month, pg_bin_dir, tokenizer_bin, workspace_root};

/// The namespaces around `core`, each with its address and the core's
/// address on the same /24 (its default route).
const HOSTS: &[(&str, &str, &str)] = &[
    ("internet", "198.51.100.10", "198.51.100.1"),
    ("checkout", "10.230.1.10", "10.230.1.1"),
    ("router", "10.230.2.10", "10.230.2.1"),
    ("ops", "10.230.3.10", "10.230.3.1"),
    ("pci", "10.230.4.5", "10.230.4.1"),
    ("db", "10.230.5.10", "10.230.5.1"),
    ("dmz", "10.230.7.10", "10.230.7.1"),
    ("acquirer", "10.230.8.10", "10.230.8.1"),
];
const PCI: &str = "10.230.4.5";
const DB: &str = "10.230.5.10";
const DMZ: &str = "10.230.7.10";
const INTERNET: &str = "198.51.100.10";
const CHECKOUT: &str = "10.230.1.10";
const ROUTER: &str = "10.230.2.10";
const OPS: &str = "10.230.3.10";
/// The test acquirer: its HTTPS port (in the vault's egress set), and a
/// second port there that is not (a plain listener: the set holds address
/// . port pairs, not addresses).
const ACQUIRER: &str = "10.230.8.10";
const ACQUIRER_PORT: u16 = 9443;
const ACQUIRER_OTHER_PORT: u16 = 9444;
/// The vault's name for it (`[[upstream]]` `name`, the route's `{upstream}`).
const UPSTREAM: &str = "acquirer-seg";
/// Listeners in `internet` the card-data hosts must not reach.
const INTERNET_PORTS: [u16; 2] = [443, ACQUIRER_PORT];
/// The merchant's page the collection form is framed in.
const SHOP: &str = "https://shop.example";

/// This test's values for the address defines of
/// `deploy/nftables/cardvault-addresses.nft` (the ports stay as shipped).
const ADDRESS_DEFINES: &[(&str, &str)] = &[
    ("tokenizer_hosts", "{ 10.230.4.5 }"),
    ("db_host", "10.230.5.10"),
    ("checkout_nets", "{ 10.230.1.0/24 }"),
    ("router_nets", "{ 10.230.2.0/24 }"),
    ("ops_nets", "{ 10.230.3.0/24 }"),
    ("edge_hosts", "{ 10.230.7.10 }"),
    // Nobody there: allowed by the rules, never used by the test.
    ("dns_servers", "{ 10.230.6.53 }"),
    ("ntp_servers", "{ 10.230.6.123 }"),
    ("dmz_dns_servers", "{ 10.230.7.53 }"),
    ("dmz_ntp_servers", "{ 10.230.7.123 }"),
    // The test acquirer's HTTPS port only (ACQUIRER . ACQUIRER_PORT).
    ("acquirer_endpoints", "{ 10.230.8.10 . 9443 }"),
];

/// The acquirer's own firewall (not ours, not shipped): it admits the
/// tokenizer host on its HTTPS port and nobody else, as an acquirer admits
/// only its merchants' egress addresses.
const ACQUIRER_ALLOWLIST: &str = "table inet acquirer {
	chain input {
		type filter hook input priority filter; policy drop;
		iif \"lo\" accept
		ct state established,related accept
		ip saddr 10.230.4.5 tcp dport 9443 ct state new accept
	}
}
";

/// The unprivileged user the tokenizer and the edge run as.
const SERVICE_UID: u32 = 65534;
const TENANT: &str = "shop-1";
const PAN: &str = "4111111111111111";
/// How long a probe waits for a TCP connection before calling the port
/// silent (dropped); the namespaces are on one machine, so a real answer
/// takes well under a millisecond.
const CONNECT_TIMEOUT_S: &str = "2";
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// Runs a command to completion (killed after `timeout`), output captured.
fn run_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => {
            // Our own child, by its id.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} did not finish within {timeout:?}")
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs and asserts success; returns stdout.
#[track_caller]
fn must(cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let out = run_timeout(cmd, CMD_TIMEOUT);
    assert!(out.status.success(), "{what} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// `program args...` inside network namespace `ns`.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]).args(args);
    c
}

/// `tokenizer args...` in namespace `ns` as the unprivileged service user,
/// with a clean environment.
fn tokenizer_in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "setpriv"])
        .arg(format!("--reuid={SERVICE_UID}"))
        .arg(format!("--regid={SERVICE_UID}"))
        .args(["--clear-groups", "--"])
        .arg(tokenizer_bin())
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/")
        .env("NO_COLOR", "1");
    c
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Everything the test needs, or a failure that says what is missing.
fn preflight() {
    let uid = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX);
    let mut missing = Vec::new();
    if uid != 0 {
        missing.push(
            "root (network namespaces, nftables, running services as other users)".to_string(),
        );
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("curl", "curl"),
        ("setpriv", "util-linux"),
        ("runuser", "util-linux"),
    ] {
        if !which(tool) {
            missing.push(format!("`{tool}` (apt-get install -y {package})"));
        }
    }
    let pg_user = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !pg_user {
        missing.push("the `postgres` OS user (PostgreSQL server package)".to_string());
    }
    assert!(
        missing.is_empty(),
        "the segmentation test cannot run here; it needs: {}.\n\
         It builds network namespaces and loads the deploy nftables rules, so it \
         must run as root (CI does); it never skips.",
        missing.join(", ")
    );
    // Panics with build instructions when the binary is missing.
    let _ = tokenizer_bin();
    let _ = pg_bin_dir();
}

// ---------------------------------------------------------------------------
// The segment
// ---------------------------------------------------------------------------

/// The namespaces, the PostgreSQL cluster and the tokenizer; all of it torn
/// down on drop (also during a panic), processes first.
struct Segment {
    prefix: String,
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
    pg_started: bool,
    tokenizer: Option<Child>,
    tokenizer_log: Log,
    edge: Option<Child>,
    edge_log: Log,
    /// The test acquirer, serving a listener bound in `acquirer`.
    acquirer: Option<Acquirer>,
    /// Plain listeners bound in other namespaces (never accepted from: the
    /// kernel completes the handshake, which is all a probe looks at).
    listeners: Vec<TcpListener>,
}

/// Runs `f` on a thread of its own inside network namespace `ns` (entered
/// with setns through `/run/netns/<ns>`, as `ip netns exec` does): a socket
/// it creates belongs to that namespace for good, whichever thread uses it
/// later.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let path = format!("/run/netns/{ns}");
    thread::scope(|s| {
        s.spawn(|| {
            let file = fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| format!("setns {path}: {e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| format!("a thread in namespace {ns} panicked"))?
    })
}

/// A TCP listener on `addr:port` inside namespace `ns`.
fn listen_in(ns: &str, addr: &str, port: u16) -> TcpListener {
    in_netns(ns, || TcpListener::bind((addr, port)))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("cannot listen on {addr}:{port} in {ns}: {e}"))
}

/// A process's stderr lines, as read so far.
type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Starts `c` (stderr piped) and waits until each of `wanted` is a
/// substring of some line of its stderr; every line goes to `log`. The
/// child is returned as soon as it is spawned (through `keep`), so a
/// failure to come up still tears it down.
fn spawn_until(
    mut c: Command,
    what: &str,
    wanted: &[String],
    keep: &mut Option<Child>,
    log: &Log,
) -> Result<(), String> {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let stderr = child.stderr.take().unwrap();
    *keep = Some(child);
    let (tx, rx) = mpsc::channel::<String>();
    let lines = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let line = e2e::strip_ansi(&line);
            lines.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = vec![false; wanted.len()];
    while seen.iter().any(|s| !s) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                for (i, w) in wanted.iter().enumerate() {
                    seen[i] |= line.contains(w.as_str());
                }
            }
            Err(_) => {
                let missing: Vec<_> = wanted
                    .iter()
                    .zip(&seen)
                    .filter(|(_, s)| !**s)
                    .map(|(w, _)| w.as_str())
                    .collect();
                return Err(format!("{what} did not log {missing:?}"));
            }
        }
    }
    Ok(())
}

impl Segment {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn build() -> Segment {
        let dir = tempfile::Builder::new()
            .prefix("cardvault-e2e-segment-")
            .tempdir()
            .expect("cannot create a temporary directory");
        // The service user and postgres must traverse it (not list it).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
        let mut seg = Segment {
            prefix: format!("cv{}-", std::process::id()),
            namespaces: Vec::new(),
            dir,
            pg_started: false,
            tokenizer: None,
            tokenizer_log: Default::default(),
            edge: None,
            edge_log: Default::default(),
            acquirer: None,
            listeners: Vec::new(),
        };
        let core = seg.ns("core");
        must(cmd("ip", &["netns", "add", &core]));
        seg.namespaces.push(core.clone());
        must(in_ns(&core, "ip", &["link", "set", "lo", "up"]));
        must(in_ns(&core, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]));
        for (name, addr, gw) in HOSTS {
            let ns = seg.ns(name);
            must(cmd("ip", &["netns", "add", &ns]));
            seg.namespaces.push(ns.clone());
            let link = format!("to-{name}");
            // Both ends are made inside the namespaces: nothing touches the
            // machine's own network.
            must(in_ns(
                &core,
                "ip",
                &[
                    "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            ));
            must(in_ns(
                &core,
                "ip",
                &["addr", "add", &format!("{gw}/24"), "dev", &link],
            ));
            must(in_ns(&core, "ip", &["link", "set", &link, "up"]));
            must(in_ns(&ns, "ip", &["link", "set", "lo", "up"]));
            must(in_ns(
                &ns,
                "ip",
                &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            ));
            must(in_ns(&ns, "ip", &["link", "set", "eth0", "up"]));
            must(in_ns(&ns, "ip", &["route", "add", "default", "via", gw]));
        }
        seg
    }

    /// initdb and start a private cluster in `db`, listening on its address
    /// only, trust authentication from anywhere: only the firewalls decide
    /// who reaches it.
    fn start_postgres(&mut self) {
        let bin = pg_bin_dir();
        let pgdir = self.path("pg");
        fs::create_dir(&pgdir).unwrap();
        fs::create_dir(pgdir.join("sock")).unwrap();
        must(cmd("chown", &["-R", "postgres:", pgdir.to_str().unwrap()]));
        let data = pgdir.join("data");
        let initdb = bin.join("initdb");
        let mut c = cmd("runuser", &["-u", "postgres", "--"]);
        c.arg(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .current_dir(&pgdir);
        must(c);
        let hba = data.join("pg_hba.conf");
        let mut conf = fs::read_to_string(&hba).unwrap();
        conf.push_str("\nhost all all 0.0.0.0/0 trust\n");
        fs::write(&hba, conf).unwrap();
        let options = format!(
            "-p 5432 -k {} -c listen_addresses={DB}",
            pgdir.join("sock").display()
        );
        let mut c = in_ns(&self.ns("db"), "runuser", &["-u", "postgres", "--"]);
        c.arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(pgdir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .current_dir(&pgdir);
        self.pg_started = true;
        must(c);
        let mut c = in_ns(&self.ns("db"), "runuser", &["-u", "postgres", "--"]);
        c.arg(bin.join("psql"))
            .args(["-X", "-q", "-h"])
            .arg(pgdir.join("sock"))
            .args([
                "-p",
                "5432",
                "-U",
                "postgres",
                "-c",
                "CREATE DATABASE cardvault",
            ])
            .current_dir(&pgdir);
        must(c);
    }

    fn database_url(&self) -> String {
        format!("postgres://postgres@{DB}:5432/cardvault")
    }

    /// `tokenizer dev-pki` (server certificate for the pci address), the
    /// server key handed to the service user.
    fn make_pki(&self) -> PathBuf {
        let pki = self.path("pki");
        let mut c = Command::new(tokenizer_bin());
        c.args(["dev-pki", "--out"])
            .arg(&pki)
            .args(["--server-name", PCI]);
        must(c);
        for f in [
            "ca.pem",
            "server.pem",
            "server.key",
            "client-tokenize.pem",
            "client-tokenize.key",
            "client-detokenize.pem",
            "client-detokenize.key",
            "client-auditor.pem",
            "client-auditor.key",
            "client-key_admin.pem",
            "client-key_admin.key",
            "client-collect.pem",
            "client-collect.key",
            "client-forward.pem",
            "client-forward.key",
        ] {
            assert!(pki.join(f).is_file(), "dev-pki wrote no {f}");
        }
        let key_mode = fs::metadata(pki.join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o077, 0, "server.key is readable by others");
        fs::set_permissions(&pki, fs::Permissions::from_mode(0o755)).unwrap();
        // The vault's server key, and the edge's client key (the edge
        // runs as the same unprivileged user here).
        for key in ["server.key", "client-collect.key"] {
            must(cmd(
                "chown",
                &[&SERVICE_UID.to_string(), pki.join(key).to_str().unwrap()],
            ));
        }
        pki
    }

    /// The edge's own server certificate, for the dmz address, from a CA
    /// of its own (a second `tokenizer dev-pki`): the edge never holds the
    /// vault's server key, and the internet trusts only the edge's CA.
    fn make_edge_pki(&self) -> PathBuf {
        let pki = self.path("pki-edge");
        let mut c = Command::new(tokenizer_bin());
        c.args(["dev-pki", "--out"])
            .arg(&pki)
            .args(["--server-name", DMZ]);
        must(c);
        for f in ["ca.pem", "server.pem", "server.key"] {
            assert!(pki.join(f).is_file(), "dev-pki wrote no {f}");
        }
        fs::set_permissions(&pki, fs::Permissions::from_mode(0o755)).unwrap();
        must(cmd(
            "chown",
            &[
                &SERVICE_UID.to_string(),
                pki.join("server.key").to_str().unwrap(),
            ],
        ));
        pki
    }

    /// The test acquirer in `acquirer`: a listener bound there (its HTTPS
    /// port) served by `e2e::acquirer` in this process, its server
    /// certificate for the acquirer's address; it answers with the card
    /// number it was sent (the vault must turn it back into a token). A
    /// plain listener on a second port beside it, outside the vault's
    /// egress set. Returns the vault's `[[upstream]]` table for it.
    fn start_acquirer(&mut self) -> String {
        let ns = self.ns("acquirer");
        let listener = listen_in(&ns, ACQUIRER, ACQUIRER_PORT);
        let acquirer = Acquirer::start_on(
            listener,
            AcquirerOptions {
                server_names: vec![ACQUIRER.to_string()],
                ..AcquirerOptions::default()
            },
        );
        acquirer.set_responder(|r| {
            let number = serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|v| v["card"]["number"].as_str().map(str::to_owned))
                .unwrap_or_default();
            Response::json(
                200,
                &json!({"status": "approved", "reference": "seg-1", "card": {"number": number}}),
            )
        });
        let table = acquirer.upstream_toml(
            UPSTREAM,
            &format!("paths = [\"/v1/payments\"]\ntenants = [{TENANT:?}]\ntimeout_ms = 10000\n"),
        );
        assert!(
            table.contains(&format!("https://{ACQUIRER}:{ACQUIRER_PORT}")),
            "{table}"
        );
        self.acquirer = Some(acquirer);
        self.listeners
            .push(listen_in(&ns, ACQUIRER, ACQUIRER_OTHER_PORT));
        for port in INTERNET_PORTS {
            self.listeners
                .push(listen_in(&self.ns("internet"), INTERNET, port));
        }
        table
    }

    fn acquirer(&self) -> &Acquirer {
        self.acquirer.as_ref().expect("the acquirer runs")
    }

    /// The service's data dir (owned by the service user, 0700), its KEK,
    /// and one principal per bound client certificate.
    fn prepare_service(&self) -> PathBuf {
        let data = self.path("data");
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        must(cmd(
            "chown",
            &[&SERVICE_UID.to_string(), data.to_str().unwrap()],
        ));
        let d = data.to_str().unwrap();
        let url = self.database_url();
        must(tokenizer_in_ns(
            &self.ns("pci"),
            &["kek", "generate", "--data-dir", d],
        ));
        // The auditor certificate stays unbound (401 below). The edge's
        // (role collect) is bound as deploy/README.md binds it: every
        // tenant, since a session names its own.
        for (name, role, tenants) in [
            ("checkout", "tokenize", TENANT),
            ("payment-router", "detokenize", TENANT),
            ("operators", "key_admin", TENANT),
            ("edge", "collect", "*"),
            // The payment router's forwarding principal (`dev-pki`'s
            // client-forward.pem).
            ("payment-router-forward", "forward", TENANT),
        ] {
            let identity = format!("spiffe://cardvault.dev/{role}");
            let out = must(tokenizer_in_ns(
                &self.ns("pci"),
                &[
                    "principal",
                    "create",
                    "--data-dir",
                    d,
                    "--database-url",
                    &url,
                    "--name",
                    name,
                    "--roles",
                    role,
                    "--tenants",
                    tenants,
                    "--cert-identity",
                    &identity,
                ],
            ));
            let created: Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("principal create printed {out:?}: {e}"));
            assert_eq!(created["name"], name, "{created}");
        }
        data
    }

    /// `tokenizer serve` in `pci` with the three TLS listeners, the edge's
    /// public origin as `--collect-public-url`, a configuration file holding
    /// `upstreams` (the `[[upstream]]` tables); waits for its three
    /// `listening on` lines and the upstream's.
    fn start_tokenizer(&mut self, data: &Path, pki: &Path, ports: &Ports, upstreams: &str) {
        let config = self.path("tokenizer.toml");
        fs::write(&config, upstreams).unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
        let p = |f: &str| pki.join(f).to_str().unwrap().to_string();
        let api = format!("{PCI}:{}", ports.api);
        let reveal = format!("{PCI}:{}", ports.reveal);
        let admin = format!("{PCI}:{}", ports.admin);
        let c = tokenizer_in_ns(
            &self.ns("pci"),
            &[
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--database-url",
                &self.database_url(),
                "--listen-api",
                &api,
                "--listen-reveal",
                &reveal,
                "--listen-admin",
                &admin,
                "--tls-cert-file",
                &p("server.pem"),
                "--tls-key-file",
                &p("server.key"),
                "--tls-client-ca-file",
                &p("ca.pem"),
                "--collect-public-url",
                &edge_origin(ports),
                "--config",
                config.to_str().unwrap(),
            ],
        );
        let mut wanted: Vec<String> = [("api", &api), ("reveal", &reveal), ("admin", &admin)]
            .iter()
            .map(|(what, addr)| format!("listening on {addr} ({what}"))
            .collect();
        wanted.push("forwarding upstream configured".to_string());
        let log = self.tokenizer_log.clone();
        if let Err(e) = spawn_until(c, "the tokenizer", &wanted, &mut self.tokenizer, &log) {
            panic!("{e}; log:\n{}", self.log());
        }
    }

    /// `tokenizer edge` in `dmz`: its collect listener with its own
    /// certificate, the vault's api listener at the pci address over
    /// mutual TLS (the `collect` client certificate, the vault's CA);
    /// waits for its `listening on` line.
    fn start_edge(&mut self, pki: &Path, edge_pki: &Path, ports: &Ports) {
        let listen = format!("{DMZ}:{}", ports.collect);
        let vault = format!("https://{PCI}:{}", ports.api);
        let f = |dir: &Path, name: &str| dir.join(name).to_str().unwrap().to_string();
        let c = tokenizer_in_ns(
            &self.ns("dmz"),
            &[
                "edge",
                "--listen",
                &listen,
                "--tls-cert-file",
                &f(edge_pki, "server.pem"),
                "--tls-key-file",
                &f(edge_pki, "server.key"),
                "--public-url",
                &edge_origin(ports),
                "--vault-url",
                &vault,
                "--vault-ca-file",
                &f(pki, "ca.pem"),
                "--client-cert-file",
                &f(pki, "client-collect.pem"),
                "--client-key-file",
                &f(pki, "client-collect.key"),
            ],
        );
        let wanted = [format!("listening on {listen} (collect, https)")];
        let log = self.edge_log.clone();
        if let Err(e) = spawn_until(c, "the edge", &wanted, &mut self.edge, &log) {
            panic!("{e}; log:\n{}", self.edge_log());
        }
    }

    fn edge_log(&self) -> String {
        self.edge_log.lock().unwrap().join("\n")
    }

    fn log(&self) -> String {
        self.tokenizer_log.lock().unwrap().join("\n")
    }

    /// Loads the shipped rulesets: `cardvault.nft` in `pci`, `database.nft`
    /// in `db`, with this test's addresses file first on the include path.
    fn load_firewalls(&self) {
        let shipped = workspace_root().join("deploy/nftables");
        let include = self.path("nft");
        fs::create_dir(&include).unwrap();
        fs::write(
            include.join("cardvault-addresses.nft"),
            test_addresses(&shipped.join("cardvault-addresses.nft")),
        )
        .unwrap();
        for (ns, file) in [
            ("pci", "cardvault.nft"),
            ("db", "database.nft"),
            ("dmz", "edge.nft"),
        ] {
            let mut c = in_ns(&self.ns(ns), "nft", &["-I"]);
            c.arg(&include).arg("-f").arg(shipped.join(file));
            must(c);
        }
        // The acquirer's own (see ACQUIRER_ALLOWLIST).
        let allowlist = self.path("acquirer-allowlist.nft");
        fs::write(&allowlist, ACQUIRER_ALLOWLIST).unwrap();
        must(in_ns(
            &self.ns("acquirer"),
            "nft",
            &["-f", allowlist.to_str().unwrap()],
        ));
        // The tokenizer host's egress set holds the test's acquirer only.
        let set = must(in_ns(
            &self.ns("pci"),
            "nft",
            &["list", "set", "inet", "cardvault", "acquirers"],
        ));
        assert!(
            set.contains(&format!("{ACQUIRER} . {ACQUIRER_PORT}")) && !set.contains("203.0.113."),
            "the tokenizer host's set acquirers is not the test's:\n{set}"
        );
        // The test's addresses are the ones in force.
        let rules = must(in_ns(
            &self.ns("pci"),
            "nft",
            &["list", "table", "inet", "cardvault"],
        ));
        assert!(
            rules.contains("10.230.1.0/24") && rules.contains(DB) && rules.contains(DMZ),
            "the test's addresses file was not the one included:\n{rules}"
        );
        let rules = must(in_ns(
            &self.ns("dmz"),
            "nft",
            &["list", "table", "inet", "cardvault_edge"],
        ));
        assert!(
            rules.contains(PCI) && rules.contains("10.230.7.53"),
            "the test's addresses file was not the one included in dmz:\n{rules}"
        );
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // No panics here: best effort, in order, saying what failed.
        for mut child in [self.edge.take(), self.tokenizer.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The acquirer stops by connecting to its own listener: from
        // inside its namespace (from here the address has no route, and
        // its accept loop would never wake). Left running (leaked) rather
        // than hang if the namespace cannot be entered.
        if let Some(acquirer) = self.acquirer.take() {
            let ns = self.ns("acquirer");
            let slot = std::sync::Mutex::new(Some(acquirer));
            let dropped = in_netns(&ns, || drop(slot.lock().ok().and_then(|mut a| a.take())));
            if let Err(e) = dropped {
                eprintln!("segment: could not stop the test acquirer ({e})");
                std::mem::forget(slot.into_inner());
            }
        }
        self.listeners.clear();
        if self.pg_started {
            let pgdir = self.path("pg");
            let status = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_bin_dir().join("pg_ctl"))
                .arg("-D")
                .arg(pgdir.join("data"))
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .current_dir(&pgdir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !matches!(&status, Ok(s) if s.success()) {
                eprintln!("segment: could not stop PostgreSQL ({status:?})");
            }
        }
        for ns in self.namespaces.iter().rev() {
            // Anything still running in our namespaces was started by this
            // test (the namespaces are new and named after our pid).
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let deleted = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            if !matches!(&deleted, Ok(s) if s.success()) {
                eprintln!("segment: could not delete network namespace {ns} ({deleted:?})");
            }
        }
    }
}

/// The packets counted by named counter `table/counter` in namespace `ns`,
/// and the listing it was read from.
fn counted(seg: &Segment, ns: &str, table: &str, counter: &str) -> (u64, String) {
    let listed = must(in_ns(
        &seg.ns(ns),
        "nft",
        &["list", "counter", "inet", table, counter],
    ));
    let packets = listed
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (packets, listed)
}

/// The ports of the shipped addresses file.
struct Ports {
    api: u16,
    reveal: u16,
    admin: u16,
    db: u16,
    /// The edge's collect listener.
    collect: u16,
}

/// The edge's public origin: what the browser (here `internet`) calls,
/// the vault's `--collect-public-url` and the edge's `--public-url`.
fn edge_origin(ports: &Ports) -> String {
    format!("https://{DMZ}:{}", ports.collect)
}

fn shipped_define(text: &str, name: &str) -> String {
    text.lines()
        .filter_map(|l| l.split('#').next())
        .find_map(|l| {
            let rest = l.trim().strip_prefix("define ")?;
            let (n, v) = rest.split_once('=')?;
            (n.trim() == name).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no `define {name}` in deploy/nftables/cardvault-addresses.nft"))
}

fn shipped_ports() -> Ports {
    let text = fs::read_to_string(workspace_root().join("deploy/nftables/cardvault-addresses.nft"))
        .expect("deploy/nftables/cardvault-addresses.nft");
    let port = |name: &str| -> u16 {
        shipped_define(&text, name)
            .parse()
            .unwrap_or_else(|e| panic!("define {name}: {e}"))
    };
    Ports {
        api: port("api_port"),
        reveal: port("reveal_port"),
        admin: port("admin_port"),
        db: port("db_port"),
        collect: port("collect_port"),
    }
}

/// The shipped addresses file with every address define replaced by this
/// test's value (each must exist there: a renamed define fails here).
fn test_addresses(shipped: &Path) -> String {
    let text = fs::read_to_string(shipped).unwrap();
    let mut replaced = Vec::new();
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            for (name, value) in ADDRESS_DEFINES {
                let head = format!("define {name} ");
                if line.trim_start().starts_with(&head)
                    || line.trim_start().starts_with(&format!("define {name}="))
                {
                    replaced.push(*name);
                    return format!("define {name} = {value}");
                }
            }
            line.to_string()
        })
        .collect();
    for (name, _) in ADDRESS_DEFINES {
        assert!(
            replaced.contains(name),
            "deploy/nftables/cardvault-addresses.nft has no `define {name}`"
        );
    }
    out.join("\n") + "\n"
}

// ---------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------

/// What a TCP connection attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// The TCP handshake completed.
    Connected,
    /// Nothing answered within the connect timeout (dropped).
    Silent,
    /// Anything else (refused, unreachable...): curl's exit code and message.
    Other(i32, String),
}

/// One TCP connection attempt from namespace `ns` to `addr:port` (curl's
/// telnet client: connect, then end at once on the empty stdin).
fn reach_cmd(ns: &str, addr: &str, port: u16) -> Command {
    in_ns(
        ns,
        "curl",
        &[
            "-sS",
            "--connect-timeout",
            CONNECT_TIMEOUT_S,
            "--max-time",
            "4",
            "-w",
            "%{time_connect}",
            &format!("telnet://{addr}:{port}"),
        ],
    )
}

fn reach_of(out: &Output) -> Reach {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let connect_time: f64 = stdout
        .trim()
        .rsplit(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0.0);
    let code = out.status.code().unwrap_or(-1);
    if connect_time > 0.0 {
        Reach::Connected
    } else if code == 28 {
        Reach::Silent
    } else {
        Reach::Other(
            code,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    }
}

/// Many probes at once (each may wait out the connect timeout).
fn reach_all(probes: &[(&str, String, &str, u16)]) -> Vec<Reach> {
    thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(_, ns, addr, port)| {
                let c = reach_cmd(ns, addr, *port);
                s.spawn(move || reach_of(&run_timeout(c, Duration::from_secs(20))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// An HTTPS answer: status and JSON (or text) body.
#[derive(Debug)]
struct Https {
    curl_exit: i32,
    status: u16,
    body: String,
    stderr: String,
}

impl Https {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl std::fmt::Display for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "curl exit {}, HTTP {}: {} {}",
            self.curl_exit, self.status, self.body, self.stderr
        )
    }
}

/// One HTTPS request from namespace `ns`, verifying the server against the
/// dev CA, with the client certificate of `role` (none: no certificate).
fn https(
    seg: &Segment,
    pki: &Path,
    ns: &str,
    role: Option<&str>,
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> Https {
    let client = role.map(|role| {
        (
            pki.join(format!("client-{role}.pem")),
            pki.join(format!("client-{role}.key")),
        )
    });
    https_with(
        seg,
        ns,
        &pki.join("ca.pem"),
        client.as_ref(),
        &[],
        method,
        url,
        body,
    )
}

/// One HTTPS request from namespace `ns`, verifying the server against
/// `ca`, with an optional client certificate and key and extra headers.
/// A body goes to curl through a file (mode 0600), so a card number in it
/// is never on a command line (nor in a panic message quoting one).
#[allow(clippy::too_many_arguments)]
fn https_with(
    seg: &Segment,
    ns: &str,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    headers: &[String],
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> Https {
    static BODIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut c = in_ns(
        &seg.ns(ns),
        "curl",
        &[
            "-sS",
            "--connect-timeout",
            CONNECT_TIMEOUT_S,
            "--max-time",
            "15",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ],
    );
    c.arg("--cacert").arg(ca);
    if let Some((cert, key)) = client {
        c.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    for h in headers {
        c.arg("-H").arg(h);
    }
    let mut body_file = None;
    if let Some(body) = body {
        let n = BODIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = seg.path(&format!("body-{n}.json"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        std::io::Write::write_all(&mut f, body.to_string().as_bytes()).unwrap();
        c.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", path.display()));
        body_file = Some(path);
    }
    c.arg(url);
    let out = run_timeout(c, Duration::from_secs(30));
    if let Some(path) = body_file {
        let _ = fs::remove_file(path);
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    Https {
        curl_exit: out.status.code().unwrap_or(-1),
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn segment_firewalls_listeners_and_client_certificates() {
    let started = Instant::now();
    preflight();
    let ports = shipped_ports();
    let mut seg = Segment::build();
    seg.start_postgres();
    let pki = seg.make_pki();
    let edge_pki = seg.make_edge_pki();
    let data = seg.prepare_service();
    let upstreams = seg.start_acquirer();
    seg.start_tokenizer(&data, &pki, &ports, &upstreams);
    seg.start_edge(&pki, &edge_pki, &ports);

    // Every probe of the segment: (from, to, port) that must stay silent
    // once the firewalls are up. Before they are, those to a listener
    // connect (the controls below) and the others are refused at once:
    // the routing works, and the rules are what stops them afterwards.
    let listeners = [
        ("api", ports.api),
        ("reveal", ports.reveal),
        ("admin", ports.admin),
    ];
    let mut forbidden: Vec<(&str, &str, u16)> = Vec::new();
    for (_, port) in listeners {
        forbidden.push(("internet", PCI, port));
    }
    forbidden.push(("internet", PCI, 22));
    forbidden.push(("internet", PCI, ports.db));
    for ns in ["internet", "checkout", "router", "ops"] {
        forbidden.push((ns, DB, ports.db));
    }
    forbidden.push(("checkout", PCI, ports.reveal));
    forbidden.push(("checkout", PCI, ports.admin));
    forbidden.push(("router", PCI, ports.api));
    forbidden.push(("router", PCI, ports.admin));
    forbidden.push(("ops", PCI, ports.api));
    forbidden.push(("ops", PCI, ports.reveal));
    // The DMZ. From the internet, the edge host answers on its collect
    // port only.
    for port in [22, ports.api, ports.reveal, ports.admin, ports.db, 443] {
        forbidden.push(("internet", DMZ, port));
    }
    // The edge host reaches the vault's api listener and nothing else:
    // not reveal, admin or ssh of the tokenizer host, not the database,
    // not the other zones, not the internet.
    for (addr, port) in [
        (PCI, ports.reveal),
        (PCI, ports.admin),
        (PCI, 22),
        (PCI, ports.db),
        (DB, ports.db),
        (CHECKOUT, 443),
        (ROUTER, 443),
        (OPS, 22),
        (INTERNET, 443),
    ] {
        forbidden.push(("dmz", addr, port));
    }
    // The vault never calls the edge.
    forbidden.push(("pci", DMZ, ports.collect));
    // The acquirer: the tokenizer host reaches its HTTPS port (allowed,
    // below) and nothing else there; no other zone reaches it (the edge and
    // the database host by their own rules, the others by the acquirer's
    // allowlist); nothing in the internet answers a card-data host.
    for ns in ["internet", "checkout", "router", "ops", "dmz", "db"] {
        forbidden.push((ns, ACQUIRER, ACQUIRER_PORT));
    }
    forbidden.push(("pci", ACQUIRER, ACQUIRER_OTHER_PORT));
    forbidden.push(("pci", ACQUIRER, 22));
    for port in INTERNET_PORTS {
        forbidden.push(("pci", INTERNET, port));
        forbidden.push(("db", INTERNET, port));
    }

    let control: Vec<(&str, String, &str, u16)> = [
        ("internet", PCI, ports.api),
        ("internet", PCI, ports.reveal),
        ("internet", PCI, ports.admin),
        ("internet", DB, ports.db),
        ("ops", DB, ports.db),
        ("internet", DMZ, ports.collect),
        ("dmz", PCI, ports.reveal),
        ("dmz", PCI, ports.admin),
        ("dmz", DB, ports.db),
        ("pci", DMZ, ports.collect),
        ("pci", ACQUIRER, ACQUIRER_PORT),
        ("pci", ACQUIRER, ACQUIRER_OTHER_PORT),
        ("internet", ACQUIRER, ACQUIRER_PORT),
        ("checkout", ACQUIRER, ACQUIRER_PORT),
        ("dmz", ACQUIRER, ACQUIRER_PORT),
        ("db", ACQUIRER, ACQUIRER_PORT),
        ("pci", INTERNET, 443),
        ("pci", INTERNET, ACQUIRER_PORT),
    ]
    .into_iter()
    .map(|(ns, addr, port)| (ns, seg.ns(ns), addr, port))
    .collect();
    for (probe, reach) in control.iter().zip(reach_all(&control)) {
        assert_eq!(
            reach,
            Reach::Connected,
            "control (no firewall yet): {} -> {}:{} should connect",
            probe.0,
            probe.2,
            probe.3
        );
    }

    seg.load_firewalls();

    // Nothing but the allowed flows gets a TCP handshake. Egress from the
    // card-data hosts to the internet is dropped too.
    let mut probes: Vec<(&str, String, &str, u16)> = forbidden
        .iter()
        .map(|(ns, addr, port)| (*ns, seg.ns(ns), *addr, *port))
        .collect();
    // Allowed: the tokenizer host opens new connections to the database
    // and to the acquirer's HTTPS port, the internet to the edge's collect
    // port, the edge host to the vault's api listener.
    let allowed: [(&str, &str, u16); 4] = [
        ("pci", DB, ports.db),
        ("pci", ACQUIRER, ACQUIRER_PORT),
        ("internet", DMZ, ports.collect),
        ("dmz", PCI, ports.api),
    ];
    for (ns, addr, port) in allowed {
        probes.push((ns, seg.ns(ns), addr, port));
    }
    let results = reach_all(&probes);
    let mut wrong = Vec::new();
    for (probe, reach) in probes.iter().zip(&results) {
        let allowed = allowed.contains(&(probe.0, probe.2, probe.3));
        let want = if allowed {
            Reach::Connected
        } else {
            Reach::Silent
        };
        if *reach != want {
            wrong.push(format!(
                "{} -> {}:{}: {reach:?}, expected {want:?}",
                probe.0, probe.2, probe.3
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "the firewalls let through or refused the wrong flows:\n{}\n--- pci ruleset ---\n{}\n--- dmz ruleset ---\n{}",
        wrong.join("\n"),
        must(in_ns(&seg.ns("pci"), "nft", &["list", "ruleset"])),
        must(in_ns(&seg.ns("dmz"), "nft", &["list", "ruleset"]))
    );

    // The drops went through the logging chains (rate-limited log, then a
    // named counter) of the host that dropped them.
    for (ns, table, counter) in [
        ("pci", "cardvault", "dropped_in"),
        ("pci", "cardvault", "dropped_out"),
        ("db", "cardvault_db", "dropped_in"),
        ("db", "cardvault_db", "dropped_out"),
        ("dmz", "cardvault_edge", "dropped_in"),
        ("dmz", "cardvault_edge", "dropped_out"),
    ] {
        let (packets, listed) = counted(&seg, ns, table, counter);
        assert!(
            packets > 0,
            "{ns}: counter {table}/{counter} counted no drop:\n{listed}"
        );
    }

    // Each layer holds alone: the edge host's own rules (edge.nft) drop
    // its attempts on the card-data zone and on the acquirer, before the
    // tokenizer's, the database's or the acquirer's rules would; the
    // tokenizer host's (cardvault.nft output) drop what is outside its
    // egress set, the database host's (database.nft) the acquirer. One
    // probe at a time, so that the counter moves for that probe only.
    for (ns, table, addr, port, file) in [
        ("dmz", "cardvault_edge", PCI, ports.reveal, "edge.nft"),
        ("dmz", "cardvault_edge", PCI, ports.admin, "edge.nft"),
        ("dmz", "cardvault_edge", PCI, 22, "edge.nft"),
        ("dmz", "cardvault_edge", DB, ports.db, "edge.nft"),
        ("dmz", "cardvault_edge", ACQUIRER, ACQUIRER_PORT, "edge.nft"),
        (
            "pci",
            "cardvault",
            ACQUIRER,
            ACQUIRER_OTHER_PORT,
            "cardvault.nft",
        ),
        ("pci", "cardvault", INTERNET, 443, "cardvault.nft"),
        ("pci", "cardvault", INTERNET, ACQUIRER_PORT, "cardvault.nft"),
        (
            "db",
            "cardvault_db",
            ACQUIRER,
            ACQUIRER_PORT,
            "database.nft",
        ),
    ] {
        let (before, _) = counted(&seg, ns, table, "dropped_out");
        let reach = reach_of(&run_timeout(
            reach_cmd(&seg.ns(ns), addr, port),
            Duration::from_secs(20),
        ));
        let (after, listed) = counted(&seg, ns, table, "dropped_out");
        assert_eq!(reach, Reach::Silent, "{ns} -> {addr}:{port}");
        assert!(
            after > before,
            "{ns} -> {addr}:{port} was not dropped by that host's own firewall \
             ({file} output):\n{listed}"
        );
    }

    let api = format!("https://{PCI}:{}", ports.api);
    let reveal = format!("https://{PCI}:{}", ports.reveal);
    let admin = format!("https://{PCI}:{}", ports.admin);
    let exp_year = current_year_month().0 + 4;

    // checkout -> api: tokenize with its client certificate.
    let resp = https(
        &seg,
        &pki,
        "checkout",
        Some("tokenize"),
        "POST",
        &format!("{api}/v1/tokens"),
        Some(&json!({"tenant": TENANT, "pan": PAN, "exp_month": 12, "exp_year": exp_year})),
    );
    assert_eq!(resp.status, 201, "tokenize from checkout: {resp}");
    let token = resp.json()["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(token.starts_with("tok_"), "no token: {resp}");
    assert!(
        !resp.body.contains(PAN),
        "the tokenize answer holds the PAN"
    );

    // router -> reveal: detokenize gives the PAN back.
    let resp = https(
        &seg,
        &pki,
        "router",
        Some("detokenize"),
        "POST",
        &format!("{reveal}/v1/detokenize"),
        Some(&json!({"token": token, "reason": "segment test: settle order 1"})),
    );
    assert_eq!(
        resp.status, 200,
        "detokenize from the payment router: {resp}"
    );
    assert_eq!(resp.json()["pan"], PAN, "{resp}");

    // ops -> admin: metrics and readiness.
    let resp = https(
        &seg,
        &pki,
        "ops",
        Some("key_admin"),
        "GET",
        &format!("{admin}/metrics"),
        None,
    );
    assert_eq!(resp.status, 200, "metrics from ops: {resp}");
    assert!(resp.body.contains("cardvault_sealed"), "metrics: {resp}");
    let resp = https(
        &seg,
        &pki,
        "ops",
        Some("key_admin"),
        "GET",
        &format!("{admin}/readyz"),
        None,
    );
    assert_eq!(resp.status, 200, "readyz from ops: {resp}");

    // A certificate of the wrong role: the tokenize certificate on reveal.
    let resp = https(
        &seg,
        &pki,
        "router",
        Some("tokenize"),
        "POST",
        &format!("{reveal}/v1/detokenize"),
        Some(&json!({"token": token, "reason": "segment test: wrong role"})),
    );
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (403, "forbidden"),
        "{resp}"
    );
    assert!(!resp.body.contains(PAN), "a refusal holds the PAN");
    // A certificate of the right CA bound to no principal.
    let resp = https(
        &seg,
        &pki,
        "checkout",
        Some("auditor"),
        "POST",
        &format!("{api}/v1/tokens"),
        Some(&json!({"tenant": TENANT, "pan": PAN, "exp_month": 12, "exp_year": exp_year})),
    );
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (401, "unauthenticated"),
        "{resp}"
    );
    // No client certificate: refused in the handshake, or 401.
    let resp = https(
        &seg,
        &pki,
        "checkout",
        None,
        "POST",
        &format!("{api}/v1/tokens"),
        Some(&json!({"tenant": TENANT, "pan": PAN, "exp_month": 12, "exp_year": exp_year})),
    );
    assert!(
        (resp.status == 0 && resp.curl_exit != 0) || resp.status == 401,
        "a request without a client certificate was not refused: {resp}"
    );

    // Routes on the wrong listener are unknown there.
    for (ns, role, method, url, body) in [
        (
            "checkout",
            "tokenize",
            "POST",
            format!("{api}/v1/detokenize"),
            Some(json!({"token": token, "reason": "segment test: wrong listener"})),
        ),
        (
            "router",
            "detokenize",
            "GET",
            format!("{reveal}/metrics"),
            None,
        ),
        (
            "router",
            "detokenize",
            "POST",
            format!("{reveal}/v1/tokens"),
            Some(json!({"tenant": TENANT, "pan": PAN, "exp_month": 12, "exp_year": exp_year})),
        ),
        (
            "ops",
            "key_admin",
            "POST",
            format!("{admin}/v1/detokenize"),
            Some(json!({"token": token, "reason": "segment test: wrong listener"})),
        ),
        (
            "checkout",
            "tokenize",
            "GET",
            format!("{api}/v1/admin/keys"),
            None,
        ),
    ] {
        let resp = https(&seg, &pki, ns, Some(role), method, &url, body.as_ref());
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (404, "not_found"),
            "{method} {url} from {ns}: {resp}"
        );
        assert!(!resp.body.contains(PAN), "a 404 holds the PAN");
    }

    // Health on every listener, each from its own network.
    for (ns, role, url) in [
        ("checkout", "tokenize", &api),
        ("router", "detokenize", &reveal),
        ("ops", "key_admin", &admin),
    ] {
        let resp = https(
            &seg,
            &pki,
            ns,
            Some(role),
            "GET",
            &format!("{url}/healthz"),
            None,
        );
        assert_eq!(resp.status, 200, "healthz {url} from {ns}: {resp}");
    }

    let collected = collect_through_the_edge(&seg, &pki, &edge_pki, &ports, exp_year);
    forward_to_the_acquirer(&seg, &pki, &ports, &token);

    let log = seg.log();
    assert!(!log.contains(PAN), "the tokenizer logged the PAN");
    let edge_log = seg.edge_log();
    assert!(!edge_log.contains(PAN), "the edge logged the PAN");
    assert!(
        !edge_log.contains(&collected.client_secret),
        "the edge logged a client secret"
    );
    crate::report(&format!(
        "segment: {} forbidden flows silent, tokenize/detokenize/metrics through their own listeners, \
         a card collected through the edge in the DMZ, a card forwarded to the acquirer, in {:.1?}",
        forbidden.len(),
        started.elapsed()
    ));
}

/// What the end-to-end collection leaves for the final checks.
struct Collected {
    client_secret: String,
}

/// The edge's collect listener from the internet, and one card collected
/// through the DMZ for real: checkout opens a session on the vault's api
/// listener; the buyer's browser (`internet`) loads the frame and posts the
/// card to the edge, which completes the session over mutual TLS (the
/// `collect` certificate) across both firewalls; checkout reads the token
/// back and the payment router detokenizes it to the same card.
fn collect_through_the_edge(
    seg: &Segment,
    pki: &Path,
    edge_pki: &Path,
    ports: &Ports,
    exp_year: i64,
) -> Collected {
    let edge = edge_origin(ports);
    let api = format!("https://{PCI}:{}", ports.api);
    let reveal = format!("https://{PCI}:{}", ports.reveal);
    let edge_ca = edge_pki.join("ca.pem");
    let from_internet = |method: &str, path: &str, headers: &[String], body: Option<&Value>| {
        https_with(
            seg,
            "internet",
            &edge_ca,
            None,
            headers,
            method,
            &format!("{edge}{path}"),
            body,
        )
    };

    // The edge answers the internet over TLS with its own certificate.
    let resp = from_internet("GET", "/healthz", &[], None);
    assert_eq!(resp.status, 200, "edge /healthz from the internet: {resp}");
    let resp = from_internet("GET", "/v1/collect/manifest.json", &[], None);
    assert_eq!(resp.status, 200, "edge manifest from the internet: {resp}");
    assert!(
        resp.body.contains(&edge),
        "the manifest does not name the edge's origin {edge}: {resp}"
    );
    // The vault's routes are not the edge's.
    let resp = from_internet("GET", "/v1/tokens/tok_x", &[], None);
    assert_eq!(resp.status, 404, "{resp}");

    // checkout -> api: a collection session for the shop's page.
    let resp = https(
        seg,
        pki,
        "checkout",
        Some("tokenize"),
        "POST",
        &format!("{api}/v1/collect/sessions"),
        Some(&json!({"tenant": TENANT, "allowed_origin": SHOP, "reference": "order-segment-1"})),
    );
    assert_eq!(resp.status, 201, "collection session from checkout: {resp}");
    let made = resp.json();
    let session = made["session"].as_str().unwrap_or_default().to_string();
    let client_secret = made["client_secret"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let frame_url = made["frame_url"].as_str().unwrap_or_default();
    assert!(
        session.starts_with("cs_") && !client_secret.is_empty(),
        "no session: {resp}"
    );
    assert_eq!(
        frame_url,
        format!("{edge}/v1/collect/frame/{session}#{client_secret}"),
        "the frame URL is not under --collect-public-url"
    );

    // The browser loads the frame: the edge reads the session's public
    // settings from the vault (edge -> api, mutual TLS).
    let resp = from_internet("GET", &format!("/v1/collect/frame/{session}"), &[], None);
    assert_eq!(
        resp.status,
        200,
        "the frame from the internet: curl exit {}, HTTP {}, {}\n--- edge log ---\n{}",
        resp.curl_exit,
        resp.status,
        resp.stderr,
        seg.edge_log()
    );
    assert!(resp.body.contains(&session), "the frame names no session");

    // The frame posts the card to the edge, from the edge's own origin.
    let card =
        json!({"client_secret": client_secret, "pan": PAN, "exp_month": 12, "exp_year": exp_year});
    let resp = from_internet(
        "POST",
        &format!("/v1/collect/submit/{session}"),
        &[
            format!("Origin: {edge}"),
            "Sec-Fetch-Site: same-origin".to_string(),
        ],
        Some(&card),
    );
    assert!(!resp.body.contains(PAN), "the edge's answer holds the PAN");
    assert_eq!(
        resp.status,
        200,
        "submission through the edge: {resp}\n--- edge log ---\n{}",
        seg.edge_log()
    );
    let done = resp.json();
    let token = done["token"].as_str().unwrap_or_default().to_string();
    assert!(token.starts_with("tok_"), "no token: {resp}");
    assert_eq!(done["last4"], "1111", "{resp}");
    // A submission from another origin is refused by the edge.
    let resp = from_internet(
        "POST",
        &format!("/v1/collect/submit/{session}"),
        &["Origin: https://evil.example".to_string()],
        Some(&card),
    );
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (403, "forbidden_origin"),
        "{resp}"
    );

    // checkout reads the session back: completed, with the token.
    let resp = https(
        seg,
        pki,
        "checkout",
        Some("tokenize"),
        "GET",
        &format!("{api}/v1/collect/sessions/{session}"),
        None,
    );
    assert_eq!(resp.status, 200, "session from checkout: {resp}");
    let read = resp.json();
    assert_eq!(read["status"], "completed", "{resp}");
    assert_eq!(read["token"]["token"], token.as_str(), "{resp}");
    assert!(!resp.body.contains(PAN), "the session holds the PAN");

    // The card the buyer typed is the card in the vault.
    let resp = https(
        seg,
        pki,
        "router",
        Some("detokenize"),
        "POST",
        &format!("{reveal}/v1/detokenize"),
        Some(&json!({"token": token, "reason": "segment test: settle collected order"})),
    );
    assert_eq!(
        resp.status, 200,
        "detokenize of the collected token: HTTP {}",
        resp.status
    );
    assert!(
        resp.json()["pan"] == PAN,
        "the collected token does not detokenize to the card submitted"
    );

    // The edge's certificate is for the api listener only: refused on the
    // routes of another role there (the edge host cannot reach reveal or
    // admin at all, above).
    let collect_cert = (
        pki.join("client-collect.pem"),
        pki.join("client-collect.key"),
    );
    let resp = https_with(
        seg,
        "dmz",
        &pki.join("ca.pem"),
        Some(&collect_cert),
        &[],
        "POST",
        &format!("{api}/v1/tokens"),
        Some(&json!({"tenant": TENANT, "pan": PAN, "exp_month": 12, "exp_year": exp_year})),
    );
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (403, "forbidden"),
        "tokenize with the edge's certificate: {resp}"
    );
    assert!(!resp.body.contains(PAN), "a refusal holds the PAN");

    Collected { client_secret }
}

/// One forwarded call end to end (the egress side): the payment router, with
/// its `forward` certificate over TLS to the reveal listener, posts a
/// placeholder of `token`; the vault puts the card in and calls the acquirer
/// in `acquirer` over mutual TLS (the client certificate the acquirer
/// issued) across the tokenizer host's firewall; the acquirer's answer
/// comes back with its card number replaced by the token.
fn forward_to_the_acquirer(seg: &Segment, pki: &Path, ports: &Ports, token: &str) {
    let reveal = format!("https://{PCI}:{}", ports.reveal);
    let acq = seg.acquirer();
    acq.clear();
    let placeholder = format!("{{{{{token}.pan}}}}");
    let resp = https(
        seg,
        pki,
        "router",
        Some("forward"),
        "POST",
        &format!("{reveal}/v1/forward/{UPSTREAM}/v1/payments"),
        Some(&json!({"card": {"number": placeholder}, "amount": 1000, "currency": "EUR"})),
    );
    assert!(
        !resp.body.contains(PAN),
        "the forwarded answer holds the PAN"
    );
    assert_eq!(
        resp.status,
        200,
        "forward from the payment router: {resp}\n--- acquirer failures ---\n{:?}\n--- tokenizer log ---\n{}",
        acq.failures(),
        seg.log()
    );
    let answer = resp.json();
    assert_eq!(answer["status"], "approved", "{resp}");
    assert_eq!(answer["reference"], "seg-1", "{resp}");
    assert_eq!(
        answer["card"]["number"], token,
        "the acquirer's card number is not the call's token: {resp}"
    );

    let seen = acq.wait_for_requests(1, Duration::from_secs(10));
    assert_eq!(seen.len(), 1, "requests at the acquirer: {}", seen.len());
    let got = &seen[0];
    assert_eq!((got.method.as_str(), got.path()), ("POST", "/v1/payments"));
    assert!(
        got.json()["card"]["number"] == PAN,
        "the acquirer did not receive the card number"
    );
    assert_eq!(got.json()["amount"], 1000);
    assert_eq!(
        got.peer.ip().to_string(),
        PCI,
        "the acquirer was called from elsewhere than the tokenizer host"
    );
    let cert = got
        .client_cert
        .as_ref()
        .expect("the vault presented no client certificate");
    assert_eq!(
        cert.sha256,
        acq.client_cert_sha256(),
        "not the client certificate the acquirer issued"
    );
    assert!(
        cert.names.iter().any(|n| n == acq.client_identity()),
        "{cert:?}"
    );

    // The forward certificate is refused on the other listeners' routes
    // (its role only: detokenize is not forward's).
    let resp = https(
        seg,
        pki,
        "router",
        Some("forward"),
        "POST",
        &format!("{reveal}/v1/detokenize"),
        Some(&json!({"token": token, "reason": "segment test: wrong role"})),
    );
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (403, "forbidden"),
        "{resp}"
    );
    assert!(!resp.body.contains(PAN), "a refusal holds the PAN");
    assert_eq!(
        acq.request_count(),
        1,
        "a refused call reached the acquirer"
    );
}
