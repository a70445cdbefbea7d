//! The read path for analytics jobs: list, export, stats and the raw event log.
//! Parameter parsing and aggregation live in `crate::analytics`; handlers only wire them
//! to the store. Store reads run on the blocking pool.

use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};

use super::{ApiCaller, CallbackState};
use crate::{
    analytics::{
        csv_row, GroupBy, ParamError, Params, StatsBuilder, VerificationFilter, CSV_COLUMNS,
        LIST_PARAMS,
    },
    error::{ApiError, ErrorCode},
    store::{Cursor, Page, Store, StoreError, VerificationRecord},
};

/// Records read per export chunk (and per stats step): bounds memory per request.
const CHUNK: usize = 500;
/// Records a list request may read looking for matches before it returns a short page.
const SCAN_BUDGET: usize = 20_000;

type Query = web::Query<HashMap<String, String>>;

impl From<ParamError> for ApiError {
    fn from(err: ParamError) -> Self {
        ApiError::new(ErrorCode::BadRequest, err.to_string())
    }
}

fn store_error(err: StoreError) -> ApiError {
    match err {
        StoreError::BadCursor => ApiError::new(
            ErrorCode::BadRequest,
            "query parameter `cursor`: not a cursor this service issued",
        ),
        other => {
            tracing::error!(error.message = %other, "store read failed");
            ApiError::new(ErrorCode::StoreUnavailable, "the store could not be read")
        }
    }
}

fn open_store(state: &CallbackState) -> Result<Store, ApiError> {
    state
        .store
        .get()
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::StoreUnavailable, "the store is not open yet"))
}

/// Runs a store read on the blocking pool.
async fn read<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(store_error)
}

fn cursor(params: &Params<'_>) -> Result<Option<Cursor>, ApiError> {
    params
        .text("cursor")?
        .map(Cursor::decode)
        .transpose()
        .map_err(store_error)
}

fn page_json<T: serde::Serialize>(page: Page<T>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "items": page.items,
        "next_cursor": page.next.map(|c| c.encode()),
    }))
}

/// `GET /v1/verifications`: filtered, time-ordered, paginated records.
pub async fn list(
    _: ApiCaller,
    query: Query,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let values = query.into_inner();
    let params = Params::new(&values, LIST_PARAMS)?;
    let filter = VerificationFilter::from_params(&params)?;
    let (since, until) = params.range()?;
    let limit = params.limit()?;
    let after = cursor(&params)?;
    let store = open_store(&state)?;
    let page = read(move || {
        let stored_number = filter
            .number
            .as_deref()
            .map(|n| store.numbers().protect(n).into_owned());
        let keep = |r: &VerificationRecord| {
            filter.matches(r, stored_number.as_deref())
                && r.first_seen >= since
                && r.first_seen < until
        };
        // Number and reference come from their indexes; everything else bounds a scan of
        // the time index.
        let indexed = match (&stored_number, &filter.reference) {
            (Some(number), _) => Some(store.ids_by_number(number)?),
            (None, Some(reference)) => Some(store.ids_by_reference(reference)?),
            (None, None) => None,
        };
        match indexed {
            Some(ids) => store.records_by_ids(&ids, after.as_ref(), limit, keep),
            None => store.records_between(since, until, after.as_ref(), limit, SCAN_BUDGET, keep),
        }
    })
    .await?;
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

    /// Reads the next chunk of `[since, until)` after `after` and encodes it.
    pub fn chunk(
        self,
        store: &Store,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        after: Option<&Cursor>,
        size: usize,
    ) -> Result<(Vec<u8>, Option<Cursor>), StoreError> {
        match self {
            // Records are stored as the very JSON an NDJSON line holds: copy the bytes.
            ExportFormat::Ndjson => {
                let page = store.record_bytes_between(since, until, after, size)?;
                let mut out = Vec::with_capacity(page.items.iter().map(|r| r.len() + 1).sum());
                for record in &page.items {
                    out.extend_from_slice(record);
                    out.push(b'\n');
                }
                Ok((out, page.next))
            }
            ExportFormat::Csv => {
                let page = store.records_between(since, until, after, size, size, |_| true)?;
                Ok((encode_csv(page.items.iter().map(csv_row)), page.next))
            }
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
pub fn export_stream(
    store: Store,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    format: ExportFormat,
) -> impl futures_util::Stream<Item = Result<web::Bytes, StoreError>> {
    struct State {
        store: Store,
        after: Option<Cursor>,
        header: bool,
        done: bool,
    }
    let start = State {
        store,
        after: None,
        header: true,
        done: false,
    };
    futures_util::stream::unfold(start, move |mut state| async move {
        if state.done {
            return None;
        }
        let (store, after) = (state.store.clone(), state.after.clone());
        let read =
            web::block(move || format.chunk(&store, since, until, after.as_ref(), CHUNK)).await;
        let read = read
            .unwrap_or_else(|e| Err(StoreError::Flush(crate::store::FlushError(e.to_string()))));
        let (encoded, next) = match read {
            Ok(chunk) => chunk,
            Err(err) => {
                state.done = true;
                return Some((Err(err), state));
            }
        };
        let mut chunk = if state.header {
            format.header()
        } else {
            Vec::new()
        };
        chunk.extend(encoded);
        state.header = false;
        state.done = next.is_none();
        state.after = next;
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
    let store = open_store(&state)?;
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

/// Aggregates every record in `[since, until)`.
pub fn compute_stats(
    store: &Store,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    group_by: Vec<GroupBy>,
) -> Result<Vec<crate::analytics::GroupStats>, StoreError> {
    let mut stats = StatsBuilder::new(group_by);
    let mut after = None;
    loop {
        let page = store.record_bytes_between(since, until, after.as_ref(), CHUNK)?;
        for stored in &page.items {
            stats.add_stored(stored)?;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(stats.finish()),
        }
    }
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
    let group_by = GroupBy::parse_list(&params)?;
    let store = open_store(&state)?;
    let groups = read(move || compute_stats(&store, since, until, group_by)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "since": since,
        "until": until,
        "groups": groups,
    })))
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
    let limit = params.limit()?;
    let after = cursor(&params)?;
    let store = open_store(&state)?;
    let page = read(move || store.events_between(since, until, after.as_ref(), limit)).await?;
    Ok(page_json(page))
}
