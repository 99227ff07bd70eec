//! A writer for the Prometheus text exposition format (version 0.0.4).
//!
//! Written by hand on purpose: `prometheus-client` emits OpenMetrics text, where a
//! counter's `# HELP`/`# TYPE` lines name the family without `_total`; the Prometheus
//! text parser behind `promtool check metrics` then reports every counter as having
//! no help text. Our metrics are plain atomics read at scrape time, so all we need
//! from a library is this encoding, which is small and fully specified.

use std::fmt::Write;

/// Accumulates one scrape's output.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// Metric family types we emit.
#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<f64>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let v: f64 = value.into();
        if v.is_infinite() {
            let _ = writeln!(self.out, " {}", if v > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = writeln!(self.out, " {v}");
        }
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values_and_help() {
        let mut e = Exposition::new();
        e.family("x_total", "a\nb", Kind::Counter);
        e.sample("x_total", &[("route", "a\"b\\c")], 3u32);
        e.sample("x_total", &[], f64::INFINITY);
        assert_eq!(
            e.finish(),
            "# HELP x_total a\\nb\n# TYPE x_total counter\nx_total{route=\"a\\\"b\\\\c\"} 3\nx_total +Inf\n"
        );
    }
}
