//! Starting and stopping the servers under test (herald, the Node reference, the floor) and a
//! private redis-server, each pinned with `taskset`, and writing their membership fixtures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::Connection;
use tokio::process::{Child, Command};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Herald,
    Node,
    Floor,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Herald => "herald",
            Kind::Node => "node",
            Kind::Floor => "floor",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s.trim() {
            "herald" => Some(Kind::Herald),
            "node" => Some(Kind::Node),
            "floor" => Some(Kind::Floor),
            _ => None,
        }
    }
}

/// What every server start needs: secrets, paths, fixture files, pinning.
pub struct Env {
    pub tmp: PathBuf,
    pub jwt_secret: String,
    pub publish_token: String,
    pub db_path: PathBuf,
    pub fixture_json: PathBuf,
    pub herald_bin: PathBuf,
    pub node_bin: String,
    pub node_dir: PathBuf,
    pub floor_bin: PathBuf,
    pub redis_bin: String,
    /// `taskset -c <cpus>` for the servers, or none.
    pub pin: Option<String>,
    pub max_connections: u32,
}

/// Pids of every child we started, so ctrl-c can end exactly those.
pub static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub fn kill_all_children() {
    let pids = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for pid in pids {
        // SAFETY: kill(2) on a pid we spawned ourselves.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    pub async fn stop(mut self) {
        // SAFETY: kill(2) on a pid we spawned ourselves.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(8), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // kill_on_drop ends a child that was not stopped; either way it leaves the registry.
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != self.pid);
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub struct Instance {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Instance {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its `/metrics` text, or `None` when it did not answer within 5 s.
    pub async fn metrics(&self) -> Option<String> {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().ok()?;
        http.get(format!("{}/metrics", self.base_url())).send().await.ok()?.text().await.ok()
    }
}

/// The value of a metric in Prometheus' text format, summed over its label sets (`None` when
/// it has no sample).
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => &labelled[labelled.find("} ")? + 1..],
                None => rest,
            };
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() as u64)
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn spawn(env: &Env, name: &str, program: &Path, args: &[&str], vars: &[(&str, String)], cwd: &Path) -> Result<Proc> {
    let log = env.tmp.join(format!("{name}.log"));
    let out = std::fs::File::create(&log)?;
    let err = out.try_clone()?;
    let mut cmd = match &env.pin {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("HERALD_") || k.starts_with("FLOOR_") || k == "PORT" || k == "REDIS_URL" || k == "HOST" {
            cmd.env_remove(k.as_ref());
        }
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.current_dir(cwd).stdin(Stdio::null()).stdout(out).stderr(err).kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("spawn {}", program.display()))?;
    let pid = child.id().context("child pid")?;
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    Ok(Proc { name: name.to_string(), pid, child, log })
}

/// Starts one instance of `kind` on a free port and waits until `/readyz` answers 200.
/// `herald_vars` are extra settings for herald (the other servers have none).
pub async fn start(
    env: &Env,
    kind: Kind,
    label: &str,
    redis_url: Option<&str>,
    herald_vars: &[(&'static str, String)],
) -> Result<Instance> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let name = format!("{}-{label}", kind.name());
    let proc = match kind {
        Kind::Herald => {
            let mut vars = vec![
                ("HERALD_ENV", "development".to_string()),
                ("HERALD_LISTEN", addr.to_string()),
                ("HERALD_JWT_SECRET", env.jwt_secret.clone()),
                ("HERALD_PUBLISH_TOKEN", env.publish_token.clone()),
                ("HERALD_DATABASE_URL", format!("sqlite://{}", env.db_path.display())),
                ("HERALD_LOG", "warn".to_string()),
                ("HERALD_MAX_CONNECTIONS", env.max_connections.to_string()),
                ("HERALD_CLIENT_EVENT_RATE", "1000".to_string()),
                ("HERALD_CLIENT_EVENT_BURST", "1000".to_string()),
            ];
            if let Some(r) = redis_url {
                vars.push(("HERALD_REDIS_URL", r.to_string()));
            }
            vars.extend(herald_vars.iter().cloned());
            spawn(env, &name, &env.herald_bin, &[], &vars, &env.tmp)?
        }
        Kind::Node => {
            let mut vars = vec![
                ("PORT", port.to_string()),
                ("HOST", "127.0.0.1".to_string()),
                ("HERALD_JWT_SECRET", env.jwt_secret.clone()),
                ("HERALD_PUBLISH_TOKEN", env.publish_token.clone()),
                ("HERALD_FIXTURE", env.fixture_json.display().to_string()),
            ];
            if let Some(r) = redis_url {
                vars.push(("REDIS_URL", r.to_string()));
            }
            let node = which(&env.node_bin).unwrap_or_else(|| PathBuf::from(&env.node_bin));
            spawn(env, &name, &node, &["server.js"], &vars, &env.node_dir)?
        }
        Kind::Floor => {
            if redis_url.is_some() {
                bail!("floor has no multi-instance mode");
            }
            let vars = vec![
                ("PORT", port.to_string()),
                ("HERALD_JWT_SECRET", env.jwt_secret.clone()),
                ("HERALD_PUBLISH_TOKEN", env.publish_token.clone()),
            ];
            spawn(env, &name, &env.floor_bin, &[], &vars, &env.tmp)?
        }
    };
    let inst = Instance { proc, addr };
    wait_ready(&inst).await?;
    Ok(inst)
}

async fn wait_ready(inst: &Instance) -> Result<()> {
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build()?;
    let url = format!("{}/readyz", inst.base_url());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = http.get(&url).send().await
            && r.status().as_u16() == 200
        {
            return Ok(());
        }
        if crate::stats::proc_rss_kib(inst.proc.pid).is_none() {
            bail!("{} exited during start; its log:\n{}", inst.proc.name, inst.proc.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{} not ready after 60 s; its log:\n{}", inst.proc.name, inst.proc.log_tail())
}

pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

impl Redis {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A private redis-server on a free port (never the shared 6379), no persistence; `extra` are
/// more of its flags.
pub async fn start_redis(env: &Env, extra: &[&str]) -> Result<Redis> {
    let port = free_port()?;
    let redis = which(&env.redis_bin).with_context(|| format!("{} not found in PATH", env.redis_bin))?;
    let ps = port.to_string();
    let mut args = vec!["--port", ps.as_str(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    args.extend_from_slice(extra);
    let proc = spawn(env, &format!("redis-{port}"), &redis, &args, &[], &env.tmp)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if command(port, &["PING"]).await.is_ok_and(|r| r == "PONG") {
            return Ok(Redis { proc, port });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("redis-server not ready; its log:\n{}", proc.log_tail())
}

/// A private Redis Cluster of three masters on loopback (no replicas), each node pinned like the
/// servers, its slots split evenly by `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// The seed list, as herald's `HERALD_REDIS_URL`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    pub async fn stop(self) {
        for n in self.nodes {
            n.proc.stop().await;
        }
    }
}

pub async fn start_cluster(env: &Env) -> Result<Cluster> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let dir = env.tmp.join(format!("cluster-node-{}", nodes.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let dir = dir.display().to_string();
        let flags = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", dir.as_str()];
        match start_redis(env, &flags).await {
            Ok(n) => nodes.push(n),
            Err(e) => {
                Cluster { nodes }.stop().await;
                return Err(e);
            }
        }
    }
    let cluster = Cluster { nodes };
    if let Err(e) = form(&cluster).await {
        cluster.stop().await;
        return Err(e);
    }
    Ok(cluster)
}

async fn form(cluster: &Cluster) -> Result<()> {
    let cli = which("redis-cli").context("redis-cli not found in PATH (it comes with redis-server)")?;
    let mut create = Command::new(cli);
    create.args(["--cluster", "create"]);
    for n in &cluster.nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let out = create.args(["--cluster-replicas", "0", "--cluster-yes"]).stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        bail!("redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for n in &cluster.nodes {
        while !command(n.port, &["CLUSTER", "INFO"]).await.is_ok_and(|i| i.contains("cluster_state:ok")) {
            if tokio::time::Instant::now() > deadline {
                bail!("the Redis Cluster never reported cluster_state:ok");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Sends one command to the Redis on `port` and returns its reply as text (an error reply is
/// an error), within 5 s.
pub async fn command(port: u16, args: &[&str]) -> Result<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut cmd = redis::cmd(args.first().context("a command")?);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let io = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        cmd.query_async::<String>(&mut conn).await
    };
    Ok(tokio::time::timeout(Duration::from_secs(5), io).await.context("redis did not answer in 5 s")??)
}

/// `field` of `INFO <section>` as a number.
pub async fn info_number(port: u16, section: &str, field: &str) -> Option<f64> {
    let info = command(port, &["INFO", section]).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().parse().ok())
}

pub fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(prog)).find(|p| p.is_file())
}

/// (campaign, user) rows: every user `u<i>` is a member of `c0` (the one-campaign scenarios)
/// and of `c<i % campaigns>` (scenario 3).
pub fn membership_rows(users: u32, campaigns: u32) -> Vec<(String, String)> {
    let mut rows = Vec::with_capacity(users as usize * 2);
    for i in 0..users {
        rows.push(("c0".to_string(), format!("u{i}")));
        if campaigns > 1 && i % campaigns != 0 {
            rows.push((format!("c{}", i % campaigns), format!("u{i}")));
        }
    }
    rows
}

/// herald's SQLite schema: its own migrations, in order (a test checks that these are all of
/// them). herald runs them again when it starts; they create only what is missing.
const MIGRATIONS: [(&str, &str); 3] = [
    ("0001_membership.sql", include_str!("../../migrations/sqlite/0001_membership.sql")),
    ("0002_user_revocations.sql", include_str!("../../migrations/sqlite/0002_user_revocations.sql")),
    ("0003_user_revocations_by_time.sql", include_str!("../../migrations/sqlite/0003_user_revocations_by_time.sql")),
];

/// herald's SQLite store: the tables from herald's migrations, then one `campaign_members` row
/// per (campaign, user).
pub async fn write_fixture_db(path: &Path, rows: &[(String, String)]) -> Result<()> {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path).create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.context("open fixture db")?;
    for (name, sql) in MIGRATIONS {
        sqlx::raw_sql(sql).execute(&mut conn).await.with_context(|| format!("fixture db: migration {name}"))?;
    }
    let mut tx = conn.begin().await?;
    for (c, u) in rows {
        sqlx::query("INSERT INTO campaign_members (campaign_id, user_id) VALUES (?, ?)")
            .bind(c)
            .bind(u)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}

/// The Node reference's fixture: `{"members":[[campaignId,userId],...]}`.
pub fn write_fixture_json(path: &Path, rows: &[(String, String)]) -> Result<()> {
    let doc = serde_json::json!({ "members": rows, "settlements": [], "structures": [] });
    std::fs::write(path, serde_json::to_vec(&doc)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_read_by_its_exact_name_and_summed_over_its_labels() {
        let text = "# HELP herald_fleet_entries_read_total Log entries\n\
                    herald_fleet_entries_read_total_x 9\n\
                    herald_fleet_entries_read_total 1234\n\
                    herald_fleet_shards_followed 17\n\
                    herald_subscriptions{kind=\"campaign\"} 5\n\
                    herald_subscriptions{kind=\"settlement\"} 2\n\
                    herald_subscriptions_x{kind=\"campaign\"} 100\n";
        assert_eq!(metric_value(text, "herald_fleet_entries_read_total"), Some(1234));
        assert_eq!(metric_value(text, "herald_fleet_shards_followed"), Some(17));
        assert_eq!(metric_value(text, "herald_subscriptions"), Some(7));
        assert_eq!(metric_value(text, "herald_connections"), None);
    }

    #[test]
    fn the_fixture_schema_is_every_herald_migration() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/sqlite");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, MIGRATIONS.map(|(name, _)| name), "add the new migration to MIGRATIONS");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_fixture_db_has_herald_s_tables_and_the_rows() {
        let path = std::env::temp_dir().join(format!("herald-bench-test.{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rows = membership_rows(4, 3);
        write_fixture_db(&path, &rows).await.unwrap();
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
        let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
        let tables: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let tables: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(tables, ["campaign_members", "herald_user_revocations", "settlements", "structures"]);
        let members: Vec<(String, String)> =
            sqlx::query_as("SELECT campaign_id, user_id FROM campaign_members ORDER BY user_id, campaign_id")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        conn.close().await.unwrap();
        let _ = std::fs::remove_file(&path);
        let mut want = rows.clone();
        want.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        assert_eq!(members, want);
    }
}
