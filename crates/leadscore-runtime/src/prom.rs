//! The Prometheus text exposition every service's `/metrics` page is written with.
//!
//! One writer, so `# HELP` / `# TYPE` lines, label quoting and histogram series are the
//! same on every page. Label values are escaped as the format requires (`\`, `"` and
//! newlines), so a value read from a message (a model name, a topic) cannot break a page.

use std::fmt::{Display, Write as _};

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, a count and a sum.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A page of Prometheus text being written.
#[derive(Debug, Default)]
pub struct Page {
    out: String,
}

impl Page {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the current family.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A counter family of one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, Kind::Counter, help)
            .sample(name, &[], value)
    }

    /// A gauge family of one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) -> &mut Self {
        self.family(name, Kind::Gauge, help)
            .sample(name, &[], value)
    }

    /// The series of one histogram of the current family: `buckets` are (upper bound, count
    /// in that bucket alone), written cumulatively, then `+Inf`, `_count` and `_sum`.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: impl IntoIterator<Item = (f64, u64)>,
        count: u64,
        sum: f64,
    ) -> &mut Self {
        let mut cumulative = 0;
        for (bound, n) in buckets {
            cumulative += n;
            let le = bound.to_string();
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {count}");
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {count}");
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {sum}");
        self
    }

    /// Appends text another writer made (a page of its own).
    pub fn append(&mut self, text: &str) -> &mut Self {
        self.out.push_str(text);
        self
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaped_labels() {
        let mut p = Page::new();
        p.counter("a_total", "As.", 3)
            .family("b", Kind::Gauge, "Bs by model.")
            .sample("b", &[("model", "x\"y\\z\nw"), ("v", "1")], 2.5);
        assert_eq!(
            p.finish(),
            "# HELP a_total As.\n# TYPE a_total counter\na_total 3\n\
             # HELP b Bs by model.\n# TYPE b gauge\nb{model=\"x\\\"y\\\\z\\nw\",v=\"1\"} 2.5\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_inf_count_and_sum() {
        let mut p = Page::new();
        p.histogram(
            "h_ms",
            &[("stage", "decode")],
            [(1.0, 2), (5.0, 3)],
            6,
            12.5,
        );
        p.histogram("g_ms", &[], [(1.0, 1)], 1, 0.5);
        assert_eq!(
            p.finish(),
            "h_ms_bucket{stage=\"decode\",le=\"1\"} 2\nh_ms_bucket{stage=\"decode\",le=\"5\"} 5\n\
             h_ms_bucket{stage=\"decode\",le=\"+Inf\"} 6\nh_ms_count{stage=\"decode\"} 6\n\
             h_ms_sum{stage=\"decode\"} 12.5\n\
             g_ms_bucket{le=\"1\"} 1\ng_ms_bucket{le=\"+Inf\"} 1\ng_ms_count 1\ng_ms_sum 0.5\n"
        );
    }
}
