//! Reading the Prometheus text format that ftd and ftvmm serve.

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` for histogram series).
    pub name: String,
    /// The labels as written between the braces (empty if none).
    pub labels: String,
    /// The value.
    pub value: f64,
}

/// Parses the Prometheus text format strictly enough to catch a broken exposition:
/// every line is a `# HELP`/`# TYPE` comment or `name[{labels}] value` with a number.
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split_whitespace();
            let kind = words.next();
            let name = words.next();
            if !matches!(kind, Some("HELP" | "TYPE")) || name.is_none() {
                return Err(format!("bad comment line: {line}"));
            }
            if kind == Some("TYPE")
                && !matches!(
                    words.next(),
                    Some("counter" | "gauge" | "histogram" | "summary" | "untyped")
                )
            {
                return Err(format!("bad TYPE line: {line}"));
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().map_err(|_| format!("bad value: {line}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.strip_suffix('}')
                    .ok_or_else(|| format!("unclosed labels: {line}"))?,
            ),
            None => (series, ""),
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(format!("bad metric name: {line}"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: labels.to_owned(),
            value,
        });
    }
    Ok(samples)
}

/// The value of the sample `name` with exactly `labels`, if there is one.
pub fn sample(samples: &[Sample], name: &str, labels: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels == labels)
        .map(|s| s.value)
}

/// The ftd and ftvmm metric names (`ftd_...`, `ftvmm_...`, histogram series with their
/// suffix) that `text` mentions: in PromQL expressions, JSON or YAML alike.
pub fn metric_names_in(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| {
            ["ftd_", "ftvmm_"]
                .iter()
                .any(|prefix| word.starts_with(prefix) && word.len() > prefix.len())
        })
        .map(str::to_owned)
        .collect()
}

/// Every ftd and ftvmm metric name the shipped alert rules and dashboards use
/// (deploy/prometheus/rules.yml, deploy/grafana/*.json).
pub fn deploy_metric_names() -> std::collections::BTreeSet<String> {
    let deploy = crate::project_root().join("deploy");
    let mut files = vec![deploy.join("prometheus/rules.yml")];
    let dashboards = std::fs::read_dir(deploy.join("grafana")).expect("deploy/grafana");
    files.extend(
        dashboards
            .filter_map(|entry| Some(entry.ok()?.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "json")),
    );
    files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|err| panic!("{}: {err}", file.display()));
            metric_names_in(&text)
        })
        .collect()
}
