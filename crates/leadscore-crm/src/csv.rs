//! Leads as CSV: the file format `leadscore crm seed --out` writes and
//! `training/` reads. Empty field = missing value. No PII columns.

use std::io::{self, Write};

use chrono::{DateTime, Utc};

use crate::Generated;

/// Column order of the file.
pub const HEADER: &str = "lead_id,company_size,industry,page_views,time_on_site,form_completion_time,referral_source,country,created_at,updated_at,status,converted_at,true_probability,deal_value";

/// Timestamps as ISO-8601 UTC with seconds, e.g. `2026-01-31T09:15:00Z`.
pub fn timestamp(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// Writes the header line.
pub fn write_header(out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "{HEADER}")
}

/// Writes one lead as a CSV line.
pub fn write_row(out: &mut impl Write, g: &Generated) -> io::Result<()> {
    let l = &g.lead;
    writeln!(
        out,
        "{},{},{},{},{},{},{},{},{},{},{},{},{:.6},{}",
        l.lead_id,
        opt(&l.company_size),
        opt(&l.industry),
        opt(&l.page_views),
        opt(&l.time_on_site),
        opt(&l.form_completion_time),
        opt(&l.referral_source),
        opt(&l.country),
        timestamp(&l.created_at),
        timestamp(&l.updated_at),
        l.status,
        l.converted_at.as_ref().map(timestamp).unwrap_or_default(),
        g.true_probability,
        g.deal_value.map(|v| format!("{v:.2}")).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Generator, GeneratorConfig};

    #[test]
    fn rows_have_as_many_fields_as_the_header_and_no_pii() {
        let mut buf = Vec::new();
        write_header(&mut buf).unwrap();
        let leads: Vec<_> = Generator::new(GeneratorConfig::default())
            .take(500)
            .collect();
        for g in &leads {
            write_row(&mut buf, g).unwrap();
        }
        let text = String::from_utf8(buf).unwrap();
        let columns = HEADER.split(',').count();
        for (line, g) in text.lines().skip(1).zip(&leads) {
            assert_eq!(line.split(',').count(), columns, "{line}");
            assert!(!line.contains(&g.pii.email) && !line.contains(&g.pii.phone));
        }
        assert_eq!(text.lines().count(), 501);
    }
}
