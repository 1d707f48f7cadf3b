//! The wrk driver (`--driver wrk`): the simple cases (baseline,
//! tokenize_new, tokenize_repeat, detokenize; one listener each) driven by wrk (Debian's
//! `wrk`: C, OpenSSL, one event loop per thread, a Lua script making each
//! request) instead of threads of blocking ureq clients.
//!
//! Why: the client shares this machine's two cores with the service. The
//! ureq clients cost about as much CPU per request as the service's whole
//! TLS, HTTP and authentication path, so they held `/v1/ping` far below
//! what the stack serves and pulled every ratio towards 1. wrk's cost per
//! request is a fraction of that: its baseline is "what the stack itself
//! serves" (issue 19 measured its targets with it).
//!
//! The requests are the ureq driver's: the same bodies, the same test
//! cards (BIN 411111, the index in nine digits, a Luhn digit, made by the
//! script; the vault refuses a wrong check digit, so a slip shows up as
//! errors), a new card for every `tokenize_new` request (each wrk thread
//! draws from its own range), tokens of the seeded sample for detokenize.
//! The script's `done` prints one JSON line: requests, duration, errors
//! (non-2xx statuses and socket errors), latency percentiles (µs). Card
//! numbers never leave the script (nothing is printed but counts).
//! Latency is wrk's own (from writing a request to reading its answer).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

type Res<T> = Result<T, String>;

/// What one wrk run measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub requests: u64,
    pub seconds: f64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// Whether wrk is installed.
pub fn available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty())
}

/// The cases this driver runs.
pub const CASES: [&str; 4] = ["baseline", "tokenize_new", "tokenize_repeat", "detokenize"];

/// Where a run sends its requests.
pub struct Target<'a> {
    /// `https://host:port` of the api listener.
    pub api: &'a str,
    /// `https://host:port` of the reveal listener.
    pub reveal: &'a str,
    /// `Bearer ...` of the bench's principal.
    pub auth: &'a str,
    /// The tenants cards are spread over (`bench` alone, or names made as
    /// `tenant_name` makes them).
    pub tenants: &'a [String],
}

/// wrk threads (the machine's cores; more would only compete with the
/// service). Each draws new card numbers from a range of
/// [`PER_THREAD`] of its own.
const THREADS: usize = 2;
/// New card numbers per wrk thread and run.
const PER_THREAD: u64 = 20_000_000;
/// Where the measured run's new card numbers start, after the warm-up's.
pub const MEASURED_OFFSET: u64 = 50_000_000;
/// The card numbers one prepared case may use (warm-up and measured run).
pub const SPAN: u64 = 100_000_000;

/// A case made ready for wrk: its script and the sample file it reads.
pub struct Prepared {
    script: std::path::PathBuf,
    base: String,
    clients: usize,
}

/// Write the script of `case` for `clients` connections. `sample`: the
/// seeded (card index, tenant, token) for repeat and detokenize; new cards
/// are numbered from `fresh` (up to `fresh + SPAN`). The script and the
/// sample file go to `dir`.
pub fn prepare(
    case: &str,
    clients: usize,
    target: &Target<'_>,
    sample: &[(u64, String, String)],
    fresh: u64,
    dir: &Path,
) -> Res<Prepared> {
    let samples = dir.join("wrk-sample.txt");
    {
        let mut text = String::with_capacity(sample.len() * 64);
        for (i, tenant, token) in sample {
            text.push_str(&format!("{i} {tenant} {token}\n"));
        }
        std::fs::write(&samples, text).map_err(|e| format!("{}: {e}", samples.display()))?;
    }
    let tenants = target
        .tenants
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(",");
    let (base, method) = match case {
        "baseline" => (target.api, "GET"),
        "tokenize_new" | "tokenize_repeat" => (target.api, "POST"),
        "detokenize" => (target.reveal, "POST"),
        other => return Err(format!("the wrk driver has no case {other}")),
    };
    let script = dir.join(format!("wrk-{case}.lua"));
    let lua = SCRIPT
        .replace("@CASE@", case)
        .replace("@METHOD@", method)
        .replace("@AUTH@", target.auth)
        .replace("@TENANTS@", &tenants)
        .replace("@SAMPLE@", &samples.display().to_string())
        .replace("@FRESH@", &fresh.to_string())
        .replace("@PER_THREAD@", &PER_THREAD.to_string());
    std::fs::write(&script, lua).map_err(|e| format!("{}: {e}", script.display()))?;
    Ok(Prepared {
        script,
        base: base.to_owned(),
        clients,
    })
}

impl Prepared {
    /// One wrk run of `seconds`; `fresh_offset` moves the new card numbers
    /// (a warm-up run and the measured one never share one).
    pub fn run(&self, seconds: u64, fresh_offset: u64) -> Res<Measured> {
        let threads = self.clients.clamp(1, THREADS);
        let out = Command::new("wrk")
            .arg(format!("-t{threads}"))
            .arg(format!("-c{}", self.clients.max(threads)))
            .arg(format!("-d{}s", seconds.max(1)))
            .arg("--timeout")
            .arg("30s")
            .arg("-s")
            .arg(&self.script)
            .arg(format!("{}/", self.base))
            .arg("--")
            .arg(fresh_offset.to_string())
            .output()
            .map_err(|e| format!("wrk: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("WRK-RESULT ").map(str::to_owned))
            .and_then(|j| serde_json::from_str(&j).ok())
            .ok_or_else(|| {
                format!(
                    "wrk printed no result (exit {:?}): {}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" / ")
                )
            })?;
        let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
        Ok(Measured {
            requests: num("requests") as u64,
            seconds: num("duration_us") / 1e6,
            errors: num("errors") as u64,
            p50_ms: num("p50_us") / 1000.0,
            p99_ms: num("p99_us") / 1000.0,
            p999_ms: num("p999_us") / 1000.0,
        })
    }
}

/// The case's script. Placeholders `@...@` are filled in by [`run`]; the
/// first script argument offsets the new card numbers (the warm-up and the
/// measured run never reuse one).
const SCRIPT: &str = r#"
local case = "@CASE@"
local auth = "@AUTH@"
local tenants = { @TENANTS@ }
local fresh = @FRESH@
local counter = 0
local samples = {}
local threads = {}

local function luhn(payload)
  local sum, double = 0, true
  for i = #payload, 1, -1 do
    local d = payload:byte(i) - 48
    if double then
      d = d * 2
      if d > 9 then d = d - 9 end
    end
    sum = sum + d
    double = not double
  end
  return payload .. tostring((10 - sum % 10) % 10)
end

local function pan(n)
  return luhn(string.format("411111%09d", n % 1000000000))
end

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local offset = tonumber(args[1] or "0")
  fresh = fresh + offset + id * @PER_THREAD@
  wrk.method = "@METHOD@"
  wrk.headers["Authorization"] = auth
  wrk.headers["Content-Type"] = "application/json"
  local f = io.open("@SAMPLE@", "r")
  if f then
    for line in f:lines() do
      local i, t, tok = line:match("^(%d+) (%S+) (%S+)$")
      if i then table.insert(samples, { tonumber(i), t, tok }) end
    end
    f:close()
  end
  math.randomseed(12345 + id)
end

local function new_card()
  counter = counter + 1
  local t = tenants[math.random(#tenants)]
  local body = '{"tenant":"' .. t .. '","pan":"' .. pan(fresh + counter) .. '","exp_month":12,"exp_year":2035}'
  return wrk.format("POST", "/v1/tokens", nil, body)
end

local function detokenize()
  local s = samples[math.random(#samples)]
  local body = '{"token":"' .. s[3] .. '","reason":"benchmark"}'
  return wrk.format("POST", "/v1/detokenize", nil, body)
end

function request()
  if case == "baseline" then
    return wrk.format("GET", "/v1/ping")
  elseif case == "tokenize_new" then
    return new_card()
  elseif case == "tokenize_repeat" then
    local s = samples[math.random(#samples)]
    local body = '{"tenant":"' .. s[2] .. '","pan":"' .. pan(s[1]) .. '","exp_month":12,"exp_year":2035}'
    return wrk.format("POST", "/v1/tokens", nil, body)
  else
    return detokenize()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;
