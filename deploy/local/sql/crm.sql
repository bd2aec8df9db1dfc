-- The CRM schema for the local stack: idempotent, applied on every `stack up`.
CREATE TABLE IF NOT EXISTS public.leads (
    lead_id              text PRIMARY KEY CHECK (lead_id <> ''),
    company_size         text CHECK (company_size IN ('Small', 'Medium', 'Large', 'Enterprise')),
    industry             text,
    page_views           integer,
    time_on_site         double precision,
    form_completion_time double precision,
    referral_source      text,
    country              text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    status               text NOT NULL DEFAULT 'new'
                         CHECK (status IN ('new', 'contacted', 'qualified', 'converted', 'lost')),
    converted_at         timestamptz,
    -- PII: never a feature, never logged, excluded from CDC at the source.
    email                text,
    phone                text,
    full_name            text
);

-- Debezium needs the full old row for updates to know what changed.
ALTER TABLE public.leads REPLICA IDENTITY FULL;

CREATE INDEX IF NOT EXISTS leads_status_idx ON public.leads (status);
CREATE INDEX IF NOT EXISTS leads_updated_at_idx ON public.leads (updated_at);

-- Scores written back by the JDBC sink connector (upsert on lead_id, delete on tombstone).
CREATE TABLE IF NOT EXISTS public.lead_scores (
    lead_id       text PRIMARY KEY,
    score         double precision NOT NULL CHECK (score >= 0 AND score <= 1),
    band          text NOT NULL CHECK (band IN ('High', 'Medium', 'Low')),
    model_name    text NOT NULL,
    model_version text NOT NULL,
    model_role    text NOT NULL,
    event_time    timestamptz,
    scored_at     timestamptz NOT NULL,
    latency_ms    double precision
);

-- The won deal's value, in the CRM's currency: set when a lead converts. The outcome
-- reports give revenue per lead by score band from it.
ALTER TABLE public.leads ADD COLUMN IF NOT EXISTS deal_value numeric(14, 2)
    CHECK (deal_value IS NULL OR deal_value >= 0);

-- Why each score: the features that moved it most, largest first, as `feature=value +0.31`
-- (the lead's value; the signed contribution to the log-odds). NULL for a model without
-- reasons (not a tree ensemble, or scorer.reasons = 0).
ALTER TABLE public.lead_scores ADD COLUMN IF NOT EXISTS reasons text[];

-- When the row was last written (set by the database, not by the sink): how long a score
-- takes to reach the CRM (`leadscore demo` reports insert -> row from it).
ALTER TABLE public.lead_scores ADD COLUMN IF NOT EXISTS written_at timestamptz;
CREATE OR REPLACE FUNCTION public.lead_scores_written_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.written_at := clock_timestamp();
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS lead_scores_written_at ON public.lead_scores;
CREATE TRIGGER lead_scores_written_at BEFORE INSERT OR UPDATE ON public.lead_scores
    FOR EACH ROW EXECUTE FUNCTION public.lead_scores_written_at();

-- Limit logical decoding to the leads table.
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'leadscore_crm') THEN
    CREATE PUBLICATION leadscore_crm FOR TABLE public.leads;
  END IF;
END $$;
