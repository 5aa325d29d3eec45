//! The real binary, run as a user would: `validate`, start-up errors, SIGTERM draining, the JSON
//! access log (and that no secret ever reaches it), and the admin endpoints.

mod support;

use bytes::Bytes;
use http::Request;
use serde_json::{json, Value};
use sidelight::http::body::full;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use support::{server, Answer, Config, Route, Upstream};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_sidelight");

/// A loopback port that was free a moment ago (the binary does not print its bound ports).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// A config file in the temp dir, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(test: &str, yaml: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("sidelight-cli-{}-{test}.yaml", std::process::id()));
        std::fs::write(&path, yaml).expect("write config");
        TempConfig(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A command for the binary with an environment that cannot leak into the test: no `RUST_LOG`
/// (the config's `log.level` must apply), no `SIDELIGHT_CONFIG`.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("SIDELIGHT_CONFIG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// Runs the binary to completion (for `validate` and start-up failures).
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn run_to_end(mut cmd: Command) -> Finished {
    let out = cmd.output().expect("run sidelight");
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn validate(config: &Path, env_remove: &[&str]) -> Finished {
    let mut cmd = command(&["validate", "--config", config.to_str().expect("utf-8 path")]);
    for name in env_remove {
        cmd.env_remove(name);
    }
    run_to_end(cmd)
}

/// A running sidelight process. Killed (SIGKILL) when dropped, so a failing test leaves nothing
/// behind; its stdout and stderr are captured by reader threads so the pipes never fill up.
struct Sidelight {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
    admin: SocketAddr,
    _config: TempConfig,
}

fn capture(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

impl Sidelight {
    /// Starts the binary with `config` (which must use `{listen}` and `{admin}` for its addresses)
    /// and `env`, and waits until `/readyz` answers 200.
    async fn start(test: &str, config: &Config, env: &[(&str, &str)]) -> Sidelight {
        let mut sidelight = Sidelight::spawn(test, config, env, free_addr(), free_addr());
        sidelight.wait_ready().await;
        sidelight
    }

    /// Starts the binary without waiting for it; `{listen}` and `{admin}` in `config` become
    /// `addr` and `admin`.
    fn spawn(
        test: &str,
        config: &Config,
        env: &[(&str, &str)],
        addr: SocketAddr,
        admin: SocketAddr,
    ) -> Sidelight {
        let yaml = config
            .yaml()
            .replace("{listen}", &addr.to_string())
            .replace("{admin}", &admin.to_string());
        let config = TempConfig::new(test, &yaml);
        let mut cmd = command(&["--config", config.path().to_str().expect("utf-8 path")]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sidelight");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            capture(child.stdout.take().expect("stdout"), stdout.clone()),
            capture(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        Sidelight {
            child,
            stdout,
            stderr,
            readers,
            addr,
            admin,
            _config: config,
        }
    }

    async fn wait_ready(&mut self) {
        let url = self.admin_url("/readyz");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "sidelight exited before it was ready ({status})\n{}",
                    self.output()
                );
            }
            if try_get(&url).await.is_some_and(|a| a.status == 200) {
                return;
            }
            if Instant::now() > end {
                panic!("sidelight not ready after 10s\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until stdout has `needle`: the pipe is read by another thread, so a
    /// line written before the process was ready may not have been collected yet.
    async fn stdout_eventually_contains(&self, needle: &str) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.stdout().contains(needle) {
            if Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the process wrote so far, for failure messages.
    fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    fn sigterm(&self) {
        self.signal("TERM");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Waits for the process to exit; then the output is complete (the reader threads are joined).
    async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status;
            }
            if Instant::now() > end {
                panic!(
                    "sidelight still running {deadline:?} after being told to stop\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sidelight {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A GET that reports failure instead of panicking (the proxy may not be up, or may be gone).
async fn try_get(url: &str) -> Option<Answer> {
    let req = Request::get(url).body(full(Bytes::new())).unwrap();
    let response = support::client_no_pool().request(req).await.ok()?;
    Some(support::collect(response).await)
}

async fn connect_refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(_))
    )
}

/// Listener and admin on `{listen}` and `{admin}`, upstream `up` with `upstream_fields`, route
/// `api` under `/api` (prefix stripped), and `sections` at the top level (JSON objects, or `{}`).
fn one_route(upstream: &str, sections: Value, upstream_fields: Value) -> Config {
    Config::new()
        .set(
            "listeners",
            json!([{ "name": "main", "address": "{listen}" }]),
        )
        .set("admin", json!({ "address": "{admin}" }))
        .with(sections)
        .upstream(Upstream::new("up", &[upstream]).with(upstream_fields))
        .route(Route::new("api", "up").path_prefix("/api").strip_prefix())
}

#[test]
fn validate_reports_every_problem_by_field_path() {
    const UNSET: &str = "SIDELIGHT_CLI_TEST_NEVER_SET";
    let config = TempConfig::new(
        "validate_reports_every_problem_by_field_path",
        &Config::new()
            .upstream(Upstream::new("openai", &["http://127.0.0.1:9"]).set(
                "headers",
                json!({ "authorization": format!("Bearer ${{{UNSET}}}") }),
            ))
            .route(Route::new("a", "opneai").path_prefix("/a"))
            .route(Route::new("b", "openai").path_prefix("nope"))
            .yaml(),
    );
    let out = validate(config.path(), &[UNSET]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let expected = [
        format!("{}: invalid config:", config.path().display()),
        r#"routes[0].upstream: unknown upstream "opneai" (did you mean "openai"?)"#.to_string(),
        format!(
            "upstreams[0].headers.authorization: environment variable {UNSET} is not set (set it, or write ${{{UNSET}:-default}})"
        ),
        r#"routes[1].match.path_prefix: must start with '/', got "nope""#.to_string(),
    ];
    let lines: Vec<&str> = out.stderr.lines().collect();
    for line in &expected {
        assert!(
            lines.contains(&line.as_str()),
            "missing line {line:?} in stderr:\n{}",
            out.stderr
        );
    }
    assert_eq!(
        lines.len(),
        expected.len(),
        "unexpected extra lines in stderr:\n{}",
        out.stderr
    );
    assert!(!out.stdout.contains("ok"), "stdout: {}", out.stdout);

    // A type error stops parsing, so it is reported alone, still by field path. Literal YAML on
    // purpose: a config no builder would write (`connect: soon`), fed to the parser as text.
    let typed = TempConfig::new(
        "validate_reports_every_problem_by_field_path-type",
        "upstreams:\n  - name: a\n    endpoints: [\"http://127.0.0.1:9\"]\n    timeouts: { connect: soon }\nroutes: [{ upstream: a }]\n",
    );
    let out = validate(typed.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("upstreams[0].timeouts.connect: ")),
        "stderr:\n{}",
        out.stderr
    );

    // The shipped example validates, with its defaults for the unset variables.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidelight.yaml");
    let out = validate(
        &shipped,
        &["OPENAI_BASE_URL", "OPENAI_API_KEY", "CLICKHOUSE_URL"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("ok (2 routes, 2 upstreams)"),
        "stdout: {}",
        out.stdout
    );

    // A missing file names the file.
    let missing = std::env::temp_dir().join(format!(
        "sidelight-cli-{}-does-not-exist.yaml",
        std::process::id()
    ));
    let out = validate(&missing, &[]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("cannot read {}", missing.display())),
        "stderr:\n{}",
        out.stderr
    );
}

/// Serde errors (which stop parsing) are reported with their field path once, like the others.
#[test]
fn type_errors_name_the_field_once() {
    // Literal YAML on purpose (not support::Config): the deliberately mistyped text is the test.
    let cases = [
        (
            "upstreams:\n  - name: a\n    endpoints: [\"http://127.0.0.1:9\"]\n    timeouts: { connect: soon }\nroutes: [{ upstream: a }]\n",
            "upstreams[0].timeouts.connect",
            "\"soon\"",
        ),
        ("routes: [{ upstream: a, upstrem: b }]\n", "routes[0]", "unknown field `upstrem`"),
    ];
    for (i, (yaml, path, what)) in cases.into_iter().enumerate() {
        let config = TempConfig::new(&format!("type_errors_name_the_field_once-{i}"), yaml);
        let out = validate(config.path(), &[]);
        assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line mentions {what}:\n{}", out.stderr));
        assert!(line.starts_with(path), "{line}");
        assert_eq!(
            line.matches(path).count(),
            1,
            "the field path is repeated: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let up = server::http1()
        .route_with_latency("/slow", "slow done", Duration::from_millis(1000))
        .run()
        .await;
    let yaml = one_route(
        &up.url(),
        json!({ "shutdown": { "drain_timeout": "10s" } }),
        json!({}),
    );
    let mut sl =
        Sidelight::start("sigterm_drains_in_flight_requests_then_exits_0", &yaml, &[]).await;

    let url = sl.url("/api/slow");
    let in_flight = tokio::spawn(async move { try_get(&url).await });
    support::eventually(
        "the upstream receives the slow request",
        Duration::from_secs(10),
        || async { up.request_count() == 1 },
    )
    .await;

    sl.sigterm();
    let addr = sl.addr;
    support::eventually(
        "the listener refuses new connections",
        Duration::from_secs(5),
        || connect_refused(addr),
    )
    .await;

    let answer = tokio::time::timeout(Duration::from_secs(15), in_flight)
        .await
        .expect("the in-flight request did not finish")
        .expect("task")
        .unwrap_or_else(|| panic!("the in-flight request failed\n{}", sl.output()));
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(answer.body, "slow done");

    let status = sl.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", sl.output());
    assert!(sl.stdout().contains("drained; bye"), "{}", sl.output());
    assert_eq!(up.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_logged_and_ignored() {
    let up = server::http1().route("/", "ok").run().await;
    let yaml = one_route(&up.url(), json!({}), json!({}));
    let mut sl = Sidelight::start("sighup_is_logged_and_ignored", &yaml, &[]).await;

    sl.signal("HUP");
    support::eventually("the SIGHUP is logged", Duration::from_secs(5), || {
        let logged = sl
            .stdout()
            .contains("SIGHUP received; hot reload is not implemented yet, ignoring");
        async move { logged }
    })
    .await;
    // A second one too: the handler stays installed.
    sl.signal("HUP");
    let answer = try_get(&sl.url("/api/"))
        .await
        .unwrap_or_else(|| panic!("sidelight stopped serving after SIGHUP\n{}", sl.output()));
    assert_eq!(answer.status, 200, "{}", answer.body);
    support::eventually("both SIGHUPs are logged", Duration::from_secs(5), || {
        let logged = sl.stdout().matches("SIGHUP received").count() == 2;
        async move { logged }
    })
    .await;
    assert!(
        sl.child.try_wait().expect("try_wait").is_none(),
        "sidelight exited on SIGHUP\n{}",
        sl.output()
    );

    sl.sigterm();
    let status = sl.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", sl.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_hung_requests_and_still_exits_0() {
    let up = server::http1().route_hang("/hang").run().await;
    let yaml = one_route(
        &up.url(),
        json!({ "shutdown": { "drain_timeout": "300ms" } }),
        json!({}),
    );
    let mut sl = Sidelight::start(
        "drain_deadline_cuts_hung_requests_and_still_exits_0",
        &yaml,
        &[],
    )
    .await;

    let url = sl.url("/api/hang");
    let in_flight = tokio::spawn(async move { try_get(&url).await });
    support::eventually(
        "the upstream receives the request",
        Duration::from_secs(10),
        || async { up.request_count() == 1 },
    )
    .await;

    sl.sigterm();
    let signalled = Instant::now();
    let status = sl.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", sl.output());
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "took {:?} to exit with a 300ms drain timeout",
        signalled.elapsed()
    );
    assert!(
        sl.stdout().contains("drain timeout reached"),
        "{}",
        sl.output()
    );

    let result = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the client never noticed the proxy was gone")
        .expect("task");
    if let Some(answer) = result {
        assert_ne!(
            answer.status, 200,
            "a hung request cannot succeed; body: {}",
            answer.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_json_and_never_contains_secrets() {
    const UPSTREAM_SECRET: &str = "sk-upstream-secret-123";
    const CLIENT_SECRET: &str = "sk-client-secret-456";
    const CLIENT_KEY: &str = "sk-client-key-789";
    let up = server::http1().route("/", "ok").run().await;
    let yaml = one_route(
        &up.url(),
        json!({ "log": { "format": "json", "level": "info" } }),
        json!({ "headers": { "authorization": "Bearer ${UPSTREAM_SECRET}" } }),
    );
    let mut sl = Sidelight::start(
        "access_log_is_json_and_never_contains_secrets",
        &yaml,
        &[("UPSTREAM_SECRET", UPSTREAM_SECRET)],
    )
    .await;

    let req = Request::get(sl.url("/api/v1/models?limit=1"))
        .header("authorization", format!("Bearer {CLIENT_SECRET}"))
        .header("x-api-key", CLIENT_KEY)
        .header("x-request-id", "log-test-1")
        .body(full(Bytes::new()))
        .unwrap();
    let answer = support::send(req).await;
    assert_eq!(answer.status, 200, "body: {}", answer.body);
    assert_eq!(answer.body, "ok");
    // The secret really came from the child's environment, so its absence from the log means something.
    assert_eq!(
        up.last_request().headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}").as_str()
    );

    let access_line = |stdout: &str| -> Option<serde_json::Value> {
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "sidelight::access" && v["request_id"] == "log-test-1")
    };
    support::eventually("the access log line", Duration::from_secs(10), || {
        let found = access_line(&sl.stdout()).is_some();
        async move { found }
    })
    .await;

    sl.sigterm();
    let status = sl.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", sl.output());

    let stdout = sl.stdout();
    let output = sl.output();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line}\n{output}"
        );
    }
    let line = access_line(&stdout).expect("access line");
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["route"], "api", "{line}");
    assert_eq!(line["upstream"], "up", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/api/v1/models", "{line}");
    assert_eq!(line["outcome"], "complete", "{line}");
    assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    assert_eq!(line["response_bytes"], 2, "{line}");

    for secret in [UPSTREAM_SECRET, CLIENT_SECRET, CLIENT_KEY] {
        assert!(
            !output.contains(secret),
            "secret {secret:?} in the output:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    const UPSTREAM_SECRET: &str = "sk-upstream-secret-admin";
    let up = server::http1().route("/", "ok").run().await;
    let yaml = one_route(
        &up.url(),
        json!({}),
        json!({ "headers": { "authorization": "Bearer ${UPSTREAM_SECRET}", "x-api-key": "literal-secret-value" } }),
    );
    let sl = Sidelight::start(
        "admin_endpoints",
        &yaml,
        &[("UPSTREAM_SECRET", UPSTREAM_SECRET)],
    )
    .await;

    let healthz = support::get(&sl.admin_url("/healthz")).await;
    assert_eq!(healthz.status, 200, "{}", healthz.body);
    let readyz = support::get(&sl.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 200, "{}", readyz.body);

    let metrics = support::get(&sl.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("sidelight_build_info"),
        "{}",
        metrics.body
    );
    assert_eq!(
        support::metric(
            &metrics.body,
            "sidelight_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{}",
        metrics.body
    );

    let config = support::get(&sl.admin_url("/config")).await;
    assert_eq!(config.status, 200);
    let shown = &config.body;
    assert!(
        shown.contains("${UPSTREAM_SECRET}"),
        "the template should be shown:\n{shown}"
    );
    assert!(
        !shown.contains(UPSTREAM_SECRET),
        "the env secret leaked:\n{shown}"
    );
    assert!(
        !shown.contains("literal-secret-value"),
        "the literal secret leaked:\n{shown}"
    );
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(
        shown.contains("idle_timeout: 4s"),
        "defaults should be filled in:\n{shown}"
    );
    let parsed: serde_yaml::Value = serde_yaml::from_str(shown).expect("/config is YAML");
    assert_eq!(
        parsed["upstreams"][0]["headers"]["x-api-key"].as_str(),
        Some("<redacted>"),
        "{shown}"
    );

    let unknown = support::get(&sl.admin_url("/nope")).await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let yaml = one_route("http://127.0.0.1:9", json!({}), json!({}));
    let mut sl = Sidelight::spawn(
        "listen_address_in_use_is_a_clear_error",
        &yaml,
        &[],
        addr,
        free_addr(),
    );
    let status = sl.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "{}", sl.output());
    let stderr = sl.stderr();
    assert!(stderr.contains("listeners[0].address"), "{}", sl.output());
    assert!(stderr.contains(&addr.to_string()), "{}", sl.output());
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_of_an_llm_request_has_model_tokens_and_time_to_first_token() {
    let stream = concat!(
        "data: {\"model\":\"gpt-log\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"model\":\"gpt-log\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5}}\n\n",
        "data: [DONE]\n\n",
    );
    let up = server::http1()
        .route_stream("/", move |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from(stream))).await;
        })
        .run()
        .await;
    let yaml = one_route(
        &up.url(),
        json!({ "log": { "format": "json", "level": "info" } }),
        json!({}),
    )
    .route_set("kind", json!("openai"));
    let mut sl = Sidelight::start(
        "access_log_of_an_llm_request_has_model_tokens_and_time_to_first_token",
        &yaml,
        &[],
    )
    .await;
    let req = Request::post(sl.url("/api/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "llm-log-1")
        .body(full(
            r#"{"model":"gpt-log","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        ))
        .unwrap();
    let answer = support::send(req).await;
    assert_eq!(answer.body, stream);

    let access_line = |stdout: &str| -> Option<serde_json::Value> {
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "sidelight::access" && v["request_id"] == "llm-log-1")
    };
    support::eventually("the access log line", Duration::from_secs(10), || {
        let found = access_line(&sl.stdout()).is_some();
        async move { found }
    })
    .await;
    let line = access_line(&sl.stdout()).expect("access line");
    assert_eq!(line["model"], "gpt-log", "{line}");
    assert_eq!(line["prompt_tokens"], 12, "{line}");
    assert_eq!(line["completion_tokens"], 5, "{line}");
    assert_eq!(line["usage_estimated"], false, "{line}");
    assert!(line["ttft_ms"].as_f64().is_some(), "{line}");
    sl.sigterm();
    let status = sl.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", sl.output());
}

/// An admin request with an optional `Authorization` value.
async fn admin_request(method: &str, url: &str, authorization: Option<&str>) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(value) = authorization {
        req = req.header("authorization", value);
    }
    let response = support::client_no_pool()
        .request(req.body(full(Bytes::new())).unwrap())
        .await
        .expect("admin answers");
    support::collect(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_every_admin_path_but_the_probes() {
    const TOKEN: &str = "admin-token-from-env-7f3a";
    let up = server::http1().route("/", "ok").run().await;
    let yaml = one_route(
        &up.url(),
        json!({ "admin": { "address": "{admin}", "token": "${ADMIN_TOKEN}" } }),
        json!({}),
    );
    let mut sl = Sidelight::start(
        "admin_token_guards_every_admin_path_but_the_probes",
        &yaml,
        &[("ADMIN_TOKEN", TOKEN)],
    )
    .await;

    // Probes need no token: a kubelet has none.
    for path in ["/healthz", "/readyz"] {
        let a = admin_request("GET", &sl.admin_url(path), None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    let bearer = format!("Bearer {TOKEN}");
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/config"),
        ("GET", "/status"),
        ("GET", "/nope"),
        ("POST", "/cache/purge"),
    ] {
        let url = sl.admin_url(path);
        for wrong in [None, Some("Bearer wrong"), Some(TOKEN), Some("Basic x")] {
            let a = admin_request(method, &url, wrong).await;
            assert_eq!(a.status, 401, "{method} {path} with {wrong:?}: {}", a.body);
            assert_eq!(a.json()["error"]["type"], "unauthorized", "{}", a.body);
            assert!(a.body.contains("Bearer"), "{}", a.body);
            assert_eq!(
                a.header("www-authenticate"),
                "Bearer realm=\"sidelight-admin\""
            );
        }
        let a = admin_request(method, &url, Some(&bearer)).await;
        let want = if path == "/nope" { 404 } else { 200 };
        assert_eq!(a.status, want, "{method} {path} with the token: {}", a.body);
    }
    let shown = admin_request("GET", &sl.admin_url("/config"), Some(&bearer))
        .await
        .body;
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(shown.contains("token: ${ADMIN_TOKEN}"), "{shown}");
    // The traffic port is not the admin port: no token there.
    assert_eq!(
        try_get(&sl.url("/api/")).await.map(|a| a.status.as_u16()),
        Some(200)
    );

    sl.sigterm();
    sl.wait_exit(Duration::from_secs(15)).await;
    assert!(!sl.stdout().contains(TOKEN), "{}", sl.output());
    assert!(
        !sl.stdout().contains("admin.token is not set"),
        "{}",
        sl.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_off_loopback_without_a_token_is_warned_about() {
    let up = server::http1().route("/", "ok").run().await;
    let yaml = one_route(&up.url(), json!({}), json!({}));
    let admin = SocketAddr::from(([0, 0, 0, 0], free_addr().port()));
    let mut sl = Sidelight::spawn(
        "an_admin_port_off_loopback_without_a_token_is_warned_about",
        &yaml,
        &[],
        free_addr(),
        admin,
    );
    sl.wait_ready().await;
    assert!(
        sl.stdout_eventually_contains(
            "the admin port is not on loopback and admin.token is not set"
        )
        .await,
        "{}",
        sl.output()
    );
}
