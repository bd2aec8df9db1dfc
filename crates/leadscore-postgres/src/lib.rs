//! PostgreSQL adapter for the CRM database.
//!
//! Owns the SQL that touches `public.leads`: upserting generated leads in
//! bulk (COPY into a temporary table, then `INSERT ... ON CONFLICT`), so a
//! re-seed with the same ids updates rather than fails. It logs counts, never
//! row contents (rows carry PII).

use bytes::Bytes;
use futures::SinkExt;
use leadscore_crm::Generated;
pub use tokio_postgres::Client;
use tokio_postgres::NoTls;

/// Errors raised by the adapter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached or refused the login.
    #[error(
        "cannot connect to PostgreSQL at {target} (is it up? try deploy/local/stack status): {source}"
    )]
    Connect {
        /// Host and database, without the password.
        target: String,
        /// Driver error.
        source: tokio_postgres::Error,
    },
    /// A statement failed.
    #[error("{action} failed: {source}")]
    Query {
        /// What was attempted.
        action: &'static str,
        /// Driver error.
        source: tokio_postgres::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `host:port/db` of a URL, for messages (never the password).
pub fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((_, rest)) => rest.to_string(),
        None => url.to_string(),
    }
}

/// Connects and drives the connection on a background task.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| Error::Connect {
            target: redact(url),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

fn csv_field(out: &mut String, v: Option<&str>) {
    if let Some(v) = v {
        // Quote everything given: names and emails may hold commas or quotes.
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    }
}

/// A timestamp for COPY, to the microsecond (Postgres' precision): a lead created now keeps
/// its sub-second time, which latency measured from `created_at` depends on.
fn timestamp(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn push_row(out: &mut String, g: &Generated) {
    let l = &g.lead;
    let fields: [Option<String>; 16] = [
        Some(l.lead_id.clone()),
        l.company_size.clone(),
        l.industry.clone(),
        l.page_views.map(|v| v.to_string()),
        l.time_on_site.map(|v| v.to_string()),
        l.form_completion_time.map(|v| v.to_string()),
        l.referral_source.clone(),
        l.country.clone(),
        Some(timestamp(&l.created_at)),
        Some(timestamp(&l.updated_at)),
        Some(l.status.to_string()),
        l.converted_at.as_ref().map(timestamp),
        Some(g.pii.email.clone()),
        Some(g.pii.phone.clone()),
        Some(g.pii.full_name.clone()),
        g.deal_value.map(|v| format!("{v:.2}")),
    ];
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(out, f.as_deref());
    }
    out.push('\n');
}

const COLUMNS: &str = "lead_id, company_size, industry, page_views, time_on_site, form_completion_time, referral_source, country, created_at, updated_at, status, converted_at, email, phone, full_name, deal_value";

/// Upserts `leads` into `public.leads` in one transaction; returns the row count.
pub async fn upsert_leads(client: &mut Client, leads: &[Generated]) -> Result<u64> {
    let tx = client.transaction().await.map_err(|source| Error::Query {
        action: "begin transaction",
        source,
    })?;
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS leads_in (LIKE public.leads INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    )
    .await
    .map_err(|source| Error::Query {
        action: "create staging table",
        source,
    })?;
    let sink = tx
        .copy_in(&format!(
            "COPY leads_in ({COLUMNS}) FROM STDIN (FORMAT csv)"
        ))
        .await
        .map_err(|source| Error::Query {
            action: "start COPY of leads",
            source,
        })?;
    let mut buf = String::with_capacity(leads.len() * 200);
    for g in leads {
        push_row(&mut buf, g);
    }
    futures::pin_mut!(sink);
    sink.send(Bytes::from(buf))
        .await
        .map_err(|source| Error::Query {
            action: "COPY leads",
            source,
        })?;
    sink.as_mut()
        .finish()
        .await
        .map_err(|source| Error::Query {
            action: "finish COPY of leads",
            source,
        })?;
    let updates = COLUMNS
        .split(", ")
        .filter(|c| *c != "lead_id")
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let n = tx
        .execute(
            &format!(
                "INSERT INTO public.leads ({COLUMNS}) SELECT {COLUMNS} FROM leads_in \
                 ON CONFLICT (lead_id) DO UPDATE SET {updates}"
            ),
            &[],
        )
        .await
        .map_err(|source| Error::Query {
            action: "upsert leads",
            source,
        })?;
    tx.commit().await.map_err(|source| Error::Query {
        action: "commit leads",
        source,
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_drops_credentials() {
        assert_eq!(redact("postgres://u:secret@h:5432/crm"), "h:5432/crm");
    }

    #[test]
    fn csv_rows_quote_and_escape() {
        let mut g = leadscore_crm::Generator::new(Default::default()).next_lead();
        g.pii.full_name = "O\"Brien, Jr".into();
        g.lead.industry = None;
        let mut out = String::new();
        push_row(&mut out, &g);
        assert!(out.contains("\"O\"\"Brien, Jr\""), "{out}");
        assert!(
            out.contains(",,"),
            "missing industry is an empty field: {out}"
        );
        assert!(out.ends_with('\n'));
    }
}
