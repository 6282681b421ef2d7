//! `cairn check` and `cairn policy test`: the policy gate.
//!
//! `check` compiles the specs, builds the policy input (the model's JSON with
//! `placement` and `plan` beside its fields), evaluates `policies/*.rego` with
//! the `policy` crate and prints the report in the format CI wants. An
//! override of a soft-mandatory policy is printed, kept in the JSON report and
//! appended to `<spec root>/.cairn/overrides.log` (one JSON object a line)
//! until the state store's audit log takes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use compiler::Sources;
use policy::eval::{Input, Override, SpecLocator};
use policy::{PolicySet, Report};

use crate::frontend::{Compiled, Warnings, compile_specs};

/// Output formats of `cairn check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    /// Human-readable text.
    Text,
    /// Versioned JSON.
    Json,
    /// SARIF 2.1.0 (code scanning).
    Sarif,
    /// JUnit XML (CI test reports).
    Junit,
}

/// `cairn check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Spec root (default: the current directory).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: CheckFormat,
    /// Waive the denials of a soft-mandatory policy (repeatable); needs --reason.
    #[arg(long = "override", value_name = "POLICY")]
    pub overrides: Vec<String>,
    /// Why the override is acceptable; recorded with it.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Policy directory (default: DIR/policies).
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// A placement JSON (`cairn place --format json`) to check as `input.placement`.
    #[arg(long, value_name = "FILE")]
    pub placement: Option<PathBuf>,
    /// A plan JSON (`cairn plan --format json`) to check as `input.plan`.
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// Also judge the commits from REV (the target branch) to HEAD as a
    /// controller following REV would (signatures, per-object authorization).
    #[arg(long, value_name = "REV")]
    pub base: Option<String>,
    /// The platform keys for --base (allowed-signers format): with it, a push
    /// a controller would refuse exits 1.
    #[arg(long, value_name = "FILE", requires = "base")]
    pub trusted_keys: Option<PathBuf>,
}

/// `cairn policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run the `test_*` rules of `policies/*_test.rego`, like `opa test`.
    Test {
        /// Spec root or policy directory (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Measure `cairn check` on a generated repository and print medians.
    Bench {
        /// Physical nodes.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// VMs.
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        /// Runs per measurement.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Policy directory (default: ./policies).
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
    },
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// `cairn check`.
pub fn check(args: CheckArgs) -> anyhow::Result<u8> {
    if !args.overrides.is_empty() && args.reason.is_none() {
        anyhow::bail!("--override needs --reason TEXT: the reason is recorded with the override");
    }
    if args.overrides.is_empty() && args.reason.is_some() {
        anyhow::bail!("--reason is given without --override POLICY");
    }
    let compiled = match compile_specs(
        &args.dir,
        None,
        Warnings::Quiet,
        "the specs do not compile, so the policies were not evaluated",
    )? {
        Ok(compiled) => compiled,
        Err(code) => return Ok(code),
    };
    let Compiled {
        sources,
        compilation,
    } = &compiled;
    let policy_dir = args
        .policies
        .clone()
        .unwrap_or_else(|| args.dir.join("policies"));
    let set = PolicySet::load_dir(&policy_dir)?;
    if set.policies.is_empty() {
        eprintln!(
            "note: no policies in {} (add NAME.rego files there)",
            policy_dir.display()
        );
    }
    // The placement policies see: the given one, or the solver's from scratch.
    let placement = match args.placement.as_deref() {
        Some(path) => read_json(path)?,
        None => serde_json::to_value(compiled.place(&Default::default()))?,
    };
    let placement = Some(placement);
    let plan = args.plan.as_deref().map(read_json).transpose()?;
    let input = Input::new(&compilation.model, placement.as_ref(), plan.as_ref())?;
    let overrides: Vec<Override> = args
        .overrides
        .iter()
        .map(|p| Override {
            policy: p.clone(),
            reason: args.reason.clone().unwrap_or_default(),
        })
        .collect();
    let locator = SpecLocator {
        sources,
        spans: &compilation.spans,
    };
    let report = match policy::eval::evaluate(&set, &input, Some(locator), &overrides) {
        Ok(r) => r,
        Err(e @ policy::eval::EvalError::UnknownOverride { .. }) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
        Err(e) => return Err(e.into()),
    };
    record_overrides(&args.dir, &report)?;
    let rendered = render(&report, args.format, &repo_prefix(&args.dir));
    let (rendered, authorized) = match &args.base {
        Some(base) => crate::authz::append_to_check(
            &args.dir,
            base,
            args.trusted_keys.as_deref(),
            match args.format {
                CheckFormat::Text => Some(false),
                CheckFormat::Json => Some(true),
                CheckFormat::Sarif | CheckFormat::Junit => None,
            },
            rendered,
        )?,
        None => (rendered, true),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(rendered.as_bytes())?;
    Ok(if report.passed() && authorized { 0 } else { 1 })
}

/// The report in a format.
pub fn render(report: &Report, format: CheckFormat, uri_prefix: &str) -> String {
    match format {
        CheckFormat::Text => policy::report::text(report),
        CheckFormat::Json => policy::report::json(report),
        CheckFormat::Sarif => policy::report::sarif(report, uri_prefix),
        CheckFormat::Junit => policy::report::junit(report),
    }
}

/// The spec root's path inside its git repository, with a trailing `/`
/// (empty at the top or outside a repository).
fn repo_prefix(dir: &Path) -> String {
    let Ok(repo) = git2::Repository::discover(dir) else {
        return String::new();
    };
    let (Some(work), Ok(dir)) = (repo.workdir(), dir.canonicalize()) else {
        return String::new();
    };
    let Ok(work) = work.canonicalize() else {
        return String::new();
    };
    match dir.strip_prefix(&work) {
        Ok(rel) if !rel.as_os_str().is_empty() => {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            format!("{}/", parts.join("/"))
        }
        _ => String::new(),
    }
}

/// Appends applied overrides to `<dir>/.cairn/overrides.log`.
fn record_overrides(dir: &Path, report: &Report) -> anyhow::Result<()> {
    let applied: Vec<_> = report
        .overrides
        .iter()
        .filter(|o| o.status == "applied")
        .collect();
    if applied.is_empty() {
        return Ok(());
    }
    let log_dir = dir.join(".cairn");
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    let path = log_dir.join("overrides.log");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    for o in applied {
        let waived: Vec<&str> = report
            .findings
            .iter()
            .filter(|f| f.policy == o.policy && f.overridden.is_some())
            .map(|f| f.message.as_str())
            .collect();
        let line = serde_json::json!({
            "time": rfc3339(now),
            "user": user,
            "policy": o.policy,
            "reason": o.reason,
            "waived": waived,
        });
        writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// `cairn policy …`.
pub fn policy(command: PolicyCommand) -> anyhow::Result<u8> {
    match command {
        PolicyCommand::Test { dir } => test(&dir),
        PolicyCommand::Bench {
            nodes,
            vms,
            runs,
            policies,
        } => bench(nodes, vms, runs, &policies),
    }
}

/// `cairn policy test`.
fn test(dir: &Path) -> anyhow::Result<u8> {
    let nested = dir.join("policies");
    let policy_dir = if nested.is_dir() {
        nested
    } else {
        dir.to_owned()
    };
    let set = PolicySet::load_dir(&policy_dir)?;
    if set.tests.is_empty() {
        eprintln!("error: no *_test.rego files in {}", policy_dir.display());
        return Ok(1);
    }
    let results = policy::testing::run_tests(&set);
    print!("{}", policy::testing::render(&results));
    let failed = results
        .iter()
        .any(|r| r.status != policy::testing::TestStatus::Pass);
    Ok(u8::from(failed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `cairn policy bench`: compile, place, input, evaluation per policy, and
/// the whole `cairn check` path, on a generated repository.
fn bench(nodes: usize, vms: usize, runs: usize, policies: &Path) -> anyhow::Result<u8> {
    let runs = runs.max(1);
    let files = compiler::generate::generate(&compiler::generate::GenConfig {
        nodes,
        vms,
        seed: 1,
    });
    let sources = Sources::from_files(files);
    let set = PolicySet::load_dir(policies)?;
    anyhow::ensure!(
        !set.policies.is_empty(),
        "no policies in {}",
        policies.display()
    );
    let compilation = compiler::compile(&sources);
    anyhow::ensure!(
        !compilation.has_errors(),
        "the generated specs do not compile"
    );
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let mut compile = vec![];
    let mut input_ms = vec![];
    let mut place_ms = vec![];
    let mut eval = vec![];
    let mut total = vec![];
    let mut per_policy: Vec<Vec<f64>> = vec![vec![]; set.policies.len()];
    let mut findings = 0;
    for _ in 0..runs {
        let t0 = Instant::now();
        let c = compiler::compile(&sources);
        compile.push(ms(t0));
        let t1 = Instant::now();
        let placement =
            compiler::place::place(&c.model, &compiler::place::PlaceOptions::default(), None);
        place_ms.push(ms(t1));
        let t1 = Instant::now();
        let input = Input::new(&c.model, Some(&serde_json::to_value(&placement)?), None)?;
        input_ms.push(ms(t1));
        let t2 = Instant::now();
        let locator = SpecLocator {
            sources: &sources,
            spans: &c.spans,
        };
        let report = policy::eval::evaluate(&set, &input, Some(locator), &[])?;
        eval.push(ms(t2));
        let _ = policy::report::json(&report);
        total.push(ms(t0));
        findings = report.findings.len();
        for (i, p) in set.policies.iter().enumerate() {
            let one = PolicySet {
                policies: vec![p.clone()],
                tests: vec![],
                data: set.data.clone(),
            };
            let t = Instant::now();
            policy::eval::evaluate(&one, &input, None, &[])?;
            per_policy[i].push(ms(t));
        }
    }
    println!(
        "policy bench: {nodes} nodes, {vms} VMs, {} policies, {runs} runs, {findings} findings (medians)",
        set.policies.len()
    );
    println!("  compile            {:9.1} ms", median(compile.clone()));
    println!("  place              {:9.1} ms", median(place_ms));
    println!("  input document     {:9.1} ms", median(input_ms));
    println!("  evaluate (all)     {:9.1} ms", median(eval));
    for (p, t) in set.policies.iter().zip(per_policy) {
        println!("    {:<22} {:7.1} ms", p.name, median(t));
    }
    let total = median(total);
    println!(
        "  check end to end   {total:9.1} ms  (compile + place + input + evaluate + report; budget 1000 ms: {:.2}x of budget; compile alone is the baseline: {:.2}x)",
        total / 1000.0,
        total / median(compile)
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::rfc3339(1_767_225_600 + 45_061),
            "2026-01-01T12:31:01Z"
        );
    }
}
