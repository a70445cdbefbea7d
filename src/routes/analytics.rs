//! The read path for analytics jobs: list, export, stats and the raw event log.
//! Parameters become store queries in `crate::analytics`; the store decides how to answer
//! them (which index, which scan). Handlers only wire the two together.

use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};

use super::{ApiCaller, CallbackState};
use crate::{
    analytics::{
        csv_row, filter_from_params, group_by_from_params, ParamError, Params, RuleOutcome,
        RuleOutcomes, CSV_COLUMNS, LIST_PARAMS,
    },
    error::{ApiError, ErrorCode},
    store::{
        Cursor, EventQuery, GroupStats, Page, StatsQuery, Store, StoreError, VerificationQuery,
        VerificationRecord,
    },
};

/// Records read per export chunk: bounds memory per request.
const CHUNK: usize = 500;
/// Records a list request may read looking for matches before it returns a short page.
const SCAN_BUDGET: usize = 20_000;

type Query = web::Query<HashMap<String, String>>;

impl From<ParamError> for ApiError {
    fn from(err: ParamError) -> Self {
        ApiError::new(ErrorCode::BadRequest, err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::BadCursor => ApiError::new(
                ErrorCode::BadRequest,
                "query parameter `cursor`: not a cursor this service issued",
            ),
            StoreError::Unavailable(why) => ApiError::new(
                ErrorCode::StoreUnavailable,
                format!("the store is not available: {why}"),
            ),
            other => {
                tracing::error!(error.message = %other, "store read failed");
                ApiError::new(ErrorCode::StoreUnavailable, "the store could not be read")
            }
        }
    }
}

fn cursor(params: &Params<'_>) -> Result<Option<Cursor>, ApiError> {
    Ok(params.text("cursor")?.map(Cursor::decode).transpose()?)
}

/// One page of a listing.
#[derive(serde::Serialize, schemars::JsonSchema)]
#[schemars(rename = "{T}Page")]
pub struct ListPage<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last one.
    pub next_cursor: Option<String>,
}

fn page_json<T: serde::Serialize>(page: Page<T>) -> HttpResponse {
    HttpResponse::Ok().json(ListPage {
        items: page.items,
        next_cursor: page.next.map(|c| c.encode()),
    })
}

/// `GET /v1/stats`'s answer.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct StatsAnswer {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// One per combination of the `group_by` values, sorted by them; one group of
    /// everything without `group_by`.
    pub groups: Vec<GroupStats>,
}

/// `GET /v1/stats/rules`'s answer.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct RuleOutcomesAnswer {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub rules: Vec<RuleOutcome>,
}

/// `GET /v1/verifications`: filtered, time-ordered, paginated records.
pub async fn list(
    _: ApiCaller,
    query: Query,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let values = query.into_inner();
    let params = Params::new(&values, LIST_PARAMS)?;
    let filter = filter_from_params(&params)?;
    let (since, until) = params.range()?;
    let query = VerificationQuery {
        since,
        until,
        filter,
        after: cursor(&params)?,
        limit: params.limit()?,
        scan_budget: SCAN_BUDGET,
    };
    let page = state.store.ready()?.verifications(query).await?;
    tracing::debug!(
        items = page.items.len(),
        more = page.next.is_some(),
        "verifications listed"
    );
    Ok(page_json(page))
}

/// Export formats.
#[derive(Clone, Copy)]
pub enum ExportFormat {
    Ndjson,
    Csv,
}

impl ExportFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Ndjson => "application/x-ndjson",
            ExportFormat::Csv => "text/csv; charset=utf-8",
        }
    }

    /// The header, if the format has one.
    pub fn header(self) -> Vec<u8> {
        match self {
            ExportFormat::Ndjson => Vec::new(),
            ExportFormat::Csv => encode_csv([CSV_COLUMNS.iter().map(|c| c.to_string()).collect()]),
        }
    }

    pub fn encode(self, records: &[VerificationRecord]) -> Vec<u8> {
        match self {
            ExportFormat::Ndjson => {
                let mut out = Vec::with_capacity(records.len() * 768);
                for record in records {
                    // Serialising a record into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut out, record);
                    out.push(b'\n');
                }
                out
            }
            ExportFormat::Csv => encode_csv(records.iter().map(csv_row)),
        }
    }
}

/// RFC 4180: comma-separated, CRLF line ends, fields quoted when they need it.
fn encode_csv(rows: impl IntoIterator<Item = Vec<String>>) -> Vec<u8> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    for row in rows {
        // Writing to a Vec cannot fail.
        let _ = writer.write_record(&row);
    }
    writer.into_inner().unwrap_or_default()
}

/// Streams every record first seen in `[since, until)`, in time order, chunk by chunk.
/// The next chunk is read (on the store's blocking threads) while this one is encoded.
pub fn export_stream(
    store: Store,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    format: ExportFormat,
) -> impl futures_util::Stream<Item = Result<web::Bytes, StoreError>> {
    type Read = tokio::task::JoinHandle<Result<Page<VerificationRecord>, StoreError>>;
    let read = move |store: &Store, after: Option<Cursor>| -> Read {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .verifications(VerificationQuery::between(since, until, CHUNK).after(after))
                .await
        })
    };
    struct State {
        store: Store,
        pending: Option<Read>,
        header: bool,
    }
    let start = State {
        pending: Some(read(&store, None)),
        store,
        header: true,
    };
    futures_util::stream::unfold(start, move |mut state| async move {
        let page = match state.pending.take()?.await {
            Ok(Ok(page)) => page,
            Ok(Err(err)) => return Some((Err(err), state)),
            Err(join) => return Some((Err(StoreError::Failed(join.to_string())), state)),
        };
        state.pending = page.next.clone().map(|next| read(&state.store, Some(next)));
        let mut chunk = if state.header {
            format.header()
        } else {
            Vec::new()
        };
        chunk.extend(format.encode(&page.items));
        state.header = false;
        Some((Ok(web::Bytes::from(chunk)), state))
    })
}

/// `GET /v1/export`: every record in the range, streamed (constant memory).
pub async fn export(
    _: ApiCaller,
    query: Query,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let values = query.into_inner();
    let params = Params::new(&values, &["since", "until", "format"])?;
    let (since, until) = params.range()?;
    let format = match params
        .choice("format", &["ndjson", "csv"])?
        .unwrap_or("ndjson")
    {
        "csv" => ExportFormat::Csv,
        _ => ExportFormat::Ndjson,
    };
    let store = state.store.ready()?.clone();
    let stream = export_stream(store, since, until, format);
    Ok(HttpResponse::Ok()
        .content_type(format.content_type())
        .streaming(futures_util::StreamExt::map(stream, |chunk| {
            chunk.map_err(|err| {
                tracing::error!(error.message = %err, "export stopped by a store error");
                actix_web::error::ErrorServiceUnavailable("the store could not be read")
            })
        })))
}

/// `GET /v1/stats`: counts, conversion and spend per group.
pub async fn stats(
    _: ApiCaller,
    query: Query,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let values = query.into_inner();
    let params = Params::new(&values, &["since", "until", "group_by"])?;
    let (since, until) = params.range()?;
    let group_by = group_by_from_params(&params)?;
    let groups = state
        .store
        .ready()?
        .stats(StatsQuery {
            since,
            until,
            group_by,
        })
        .await?;
    Ok(HttpResponse::Ok().json(StatsAnswer {
        since,
        until,
        groups,
    }))
}

/// `GET /v1/stats/rules`: per rule, how the verifications it decided or matched in
/// shadow ended, from the stored records (one walk of the range, chunk by chunk).
pub async fn rule_outcomes(
    _: ApiCaller,
    query: Query,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let values = query.into_inner();
    let params = Params::new(&values, &["since", "until"])?;
    let (since, until) = params.range()?;
    let rules = stored_rule_outcomes(state.store.ready()?, since, until).await?;
    Ok(HttpResponse::Ok().json(RuleOutcomesAnswer {
        since,
        until,
        rules,
    }))
}

/// Every rule's outcomes over the verifications first seen in `[since, until)`, read
/// chunk by chunk (constant memory however long the range).
pub async fn stored_rule_outcomes(
    store: &Store,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<RuleOutcome>, StoreError> {
    let mut outcomes = RuleOutcomes::default();
    let mut after = None;
    loop {
        let page = store
            .verifications(VerificationQuery::between(since, until, CHUNK).after(after))
            .await?;
        page.items.iter().for_each(|record| outcomes.add(record));
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(outcomes.finish()),
        }
    }
}

/// `GET /v1/events`: the raw event log, oldest first, paginated.
pub async fn events(
    _: ApiCaller,
    query: Query,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let values = query.into_inner();
    let params = Params::new(&values, &["since", "until", "limit", "cursor"])?;
    let (since, until) = params.range()?;
    let query = EventQuery {
        since,
        until,
        after: cursor(&params)?,
        limit: params.limit()?,
    };
    let page = state.store.ready()?.events(query).await?;
    Ok(page_json(page))
}
