//! Re-scoring open leads after a promotion, through the normal pipeline.
//!
//! Reads the CRM's open leads (status new, contacted or qualified; never the
//! PII columns) and produces a Debezium snapshot event (`op = r`) for each
//! to the scorer's input topic, keyed and partitioned exactly as the
//! Debezium source does (JSON key `{"lead_id": ...}`, murmur2 partitioner),
//! so a re-score and a live change of the same lead stay in order. The
//! scorer scores them like any snapshot read; the sink and the cache follow.

use std::time::{Duration, Instant};

use futures::{StreamExt, pin_mut};
use leadscore_config::KafkaConfig;
use leadscore_crm::{Lead, Status};
use leadscore_registry::{Encoder, Registry};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{Error, Result, kerr};

const OPEN: &str = "status IN ('new', 'contacted', 'qualified')";

/// Progress of a re-scoring run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Leads sent so far.
    pub sent: u64,
    /// Open leads when the run started.
    pub total: u64,
}

/// The Debezium key of a lead, as the source's JSON key converter writes it.
pub fn debezium_key(lead_id: &str) -> String {
    serde_json::json!({ "lead_id": lead_id }).to_string()
}

/// Sends every open lead to `input_topic` at most `rate` per second; `progress` is called every ~2 s and at the end.
pub async fn rescore_open_leads(
    kafka: &KafkaConfig,
    registry: &Registry,
    crm: &leadscore_postgres::Client,
    input_topic: &str,
    rate: u32,
    mut progress: impl FnMut(Progress),
) -> Result<Progress> {
    let encoder = Encoder::for_subject(
        registry,
        &leadscore_schemas::value_subject(input_topic),
        leadscore_schemas::find("crm.public.leads.Envelope.avsc")
            .map_err(leadscore_registry::Error::from)?
            .text,
    )
    .await?;
    let producer: FutureProducer = leadscore_kafka::client_config(kafka)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .create()
        .map_err(kerr("creating the producer"))?;
    let total: i64 = crm
        .query_one(
            &format!("SELECT count(*) FROM public.leads WHERE {OPEN}"),
            &[],
        )
        .await
        .map_err(|e| Error::Crm(e.to_string()))?
        .try_get(0)
        .map_err(|e| Error::Crm(e.to_string()))?;
    let mut p = Progress {
        sent: 0,
        total: total.max(0) as u64,
    };
    let sql = format!(
        "SELECT lead_id, company_size, industry, page_views, time_on_site, form_completion_time, \
         referral_source, country, created_at, updated_at, status, converted_at \
         FROM public.leads WHERE {OPEN} ORDER BY lead_id"
    );
    let rows = crm
        .query_raw(&sql, std::iter::empty::<&str>())
        .await
        .map_err(|e| Error::Crm(e.to_string()))?;
    pin_mut!(rows);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut pending = Vec::new();
    while let Some(row) = rows.next().await {
        let row = row.map_err(|e| Error::Crm(e.to_string()))?;
        let get = |e: tokio_postgres::Error| Error::Crm(e.to_string());
        let status: String = row.try_get(10).map_err(get)?;
        let lead = Lead {
            lead_id: row.try_get(0).map_err(get)?,
            company_size: row.try_get(1).map_err(get)?,
            industry: row.try_get(2).map_err(get)?,
            page_views: row.try_get(3).map_err(get)?,
            time_on_site: row.try_get(4).map_err(get)?,
            form_completion_time: row.try_get(5).map_err(get)?,
            referral_source: row.try_get(6).map_err(get)?,
            country: row.try_get(7).map_err(get)?,
            created_at: row.try_get(8).map_err(get)?,
            updated_at: row.try_get(9).map_err(get)?,
            status: status.parse::<Status>().map_err(Error::Crm)?,
            converted_at: row.try_get(11).map_err(get)?,
        };
        let now = chrono::Utc::now().timestamp_millis();
        let bytes = encoder.encode(leadscore_cdc::envelope(&lead, "r", now))?;
        let key = debezium_key(&lead.lead_id);
        let delivery = producer
            .send_result(
                FutureRecord::to(input_topic)
                    .key(key.as_str())
                    .payload(bytes.as_slice()),
            )
            .map_err(|(e, _)| kerr(format!("producing to {input_topic}"))(e))?;
        pending.push(delivery);
        p.sent += 1;
        if pending.len() >= 1_000 {
            for d in pending.drain(..) {
                d.await
                    .map_err(|_| Error::Checkpoint("delivery cancelled".into()))?
                    .map_err(|(e, _)| kerr(format!("delivering to {input_topic}"))(e))?;
            }
        }
        // Rate limit: never ahead of `rate` per second since the start.
        if rate > 0 {
            let due = Duration::from_secs_f64(p.sent as f64 / f64::from(rate));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            progress(p);
        }
    }
    for d in pending {
        d.await
            .map_err(|_| Error::Checkpoint("delivery cancelled".into()))?
            .map_err(|(e, _)| kerr(format!("delivering to {input_topic}"))(e))?;
    }
    progress(p);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_debezium_json_key() {
        assert_eq!(debezium_key("lead-1"), r#"{"lead_id":"lead-1"}"#);
        assert_eq!(debezium_key("a\"b"), r#"{"lead_id":"a\"b"}"#);
    }
}
