"""Loading labelled leads from a CSV file or the CRM's PostgreSQL."""

from __future__ import annotations

import pandas as pd

COLUMNS = [
    "lead_id", "company_size", "industry", "page_views", "time_on_site",
    "form_completion_time", "referral_source", "country", "created_at",
    "updated_at", "status", "converted_at",
]
STRINGS = ["lead_id", "company_size", "industry", "referral_source", "country", "status"]
OUTCOMES = ("converted", "lost")


class DataError(Exception):
    """The data cannot be used for training; the message says why and what to do."""


def load(source: str) -> pd.DataFrame:
    """All leads from ``source``: a CSV path or a ``postgres://`` URL. PII columns are never read."""
    if source.startswith(("postgres://", "postgresql://")):
        import psycopg

        query = f"SELECT {', '.join(COLUMNS)} FROM public.leads"
        try:
            with psycopg.connect(source) as conn, conn.cursor() as cur:
                cur.execute(query)
                rows = cur.fetchall()
        except psycopg.Error as e:
            host = source.split("@")[-1]
            raise DataError(f"cannot read public.leads from {host}: {e}") from e
        df = pd.DataFrame(rows, columns=COLUMNS)
    else:
        try:
            df = pd.read_csv(source, dtype={c: "string" for c in STRINGS}, usecols=lambda c: c in COLUMNS)
        except FileNotFoundError as e:
            raise DataError(f"data file {source} does not exist; make one with `leadscore crm seed --out {source}`") from e
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise DataError(f"data file {source} lacks columns {missing}")
    for c in STRINGS:
        df[c] = df[c].astype("object").where(df[c].notna(), None)
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    return df


def labelled(df: pd.DataFrame, months: int = 6, end: pd.Timestamp | None = None) -> tuple[pd.DataFrame, dict]:
    """Leads with an outcome created in the ``months`` before ``end`` (default: newest lead), oldest first."""
    end = end if end is not None else df["created_at"].max()
    start = end - pd.DateOffset(months=months)
    window = df[(df["created_at"] > start) & (df["created_at"] <= end) & df["status"].isin(OUTCOMES)]
    window = window.sort_values(["created_at", "lead_id"], kind="stable").reset_index(drop=True)
    info = {"start": str(start), "end": str(end), "rows": int(len(window)),
            "positives": int((window["status"] == "converted").sum())}
    return window, info
