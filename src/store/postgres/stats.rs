//! `GET /v1/stats` on PostgreSQL: the database groups and counts the stats columns of
//! the verifications in range, so a day costs one index range scan and a few hundred
//! rows back, not decoding every record. [`StatsBuilder`] turns the rows into the same
//! groups the embedded store computes record by record.

use chrono::{DateTime, NaiveDateTime, Utc};
use deadpool_postgres::Object;

use super::{failed, Cached};
use crate::{
    events::Action,
    store::{GroupBy, GroupStats, StatsBuilder, StatsQuery, StatsRow, StoreError},
};

/// The query for `group_by`: every row is one combination of the grouped columns and
/// of what a group's counts split on (request seen, action, status, currency).
fn sql(group_by: &[GroupBy]) -> String {
    let has = |g: GroupBy| group_by.contains(&g);
    // The finest time grouping asked for; coarser labels are formatted from it.
    let time = if has(GroupBy::Minute) {
        "date_trunc('minute', first_seen AT TIME ZONE 'UTC')"
    } else if has(GroupBy::Hour) {
        "date_trunc('hour', first_seen AT TIME ZONE 'UTC')"
    } else if has(GroupBy::Day) {
        "date_trunc('day', first_seen AT TIME ZONE 'UTC')"
    } else {
        "NULL::timestamp"
    };
    let or_null = |g: GroupBy, column: &'static str, null: &'static str| {
        if has(g) {
            column
        } else {
            null
        }
    };
    format!(
        "SELECT {time}, {country}, {method}, requested, action, {rule}, {on_error}, status,
                price_currency, count(*), sum(price_amount) FILTER (WHERE action = 'allow')
         FROM verigate_verifications
         WHERE record IS NOT NULL AND first_seen >= $1 AND first_seen < $2
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9",
        country = or_null(GroupBy::Country, "country", "NULL::text"),
        method = or_null(GroupBy::Method, "method", "NULL::text"),
        rule = or_null(GroupBy::Rule, "decision_rule", "NULL::text"),
        on_error = or_null(GroupBy::Rule, "on_error", "false"),
    )
}

/// Counts, conversion and spend per group of the verifications first seen in range.
pub(super) async fn aggregate(
    client: &Object,
    query: &StatsQuery,
) -> Result<Vec<GroupStats>, StoreError> {
    let rows = client
        .cached_query(&sql(&query.group_by), &[&query.since, &query.until])
        .await
        .map_err(failed)?;
    let mut builder = StatsBuilder::new(query.group_by.clone());
    for row in rows {
        let get = |e: tokio_postgres::Error| failed(e);
        let time: Option<NaiveDateTime> = row.try_get(0).map_err(get)?;
        let country: Option<&str> = row.try_get(1).map_err(get)?;
        let method: Option<&str> = row.try_get(2).map_err(get)?;
        let action: Option<&str> = row.try_get(4).map_err(get)?;
        let rule: Option<&str> = row.try_get(5).map_err(get)?;
        let currency: Option<&str> = row.try_get(8).map_err(get)?;
        let count: i64 = row.try_get(9).map_err(get)?;
        let spent: Option<f64> = row.try_get(10).map_err(get)?;
        let action = match action {
            Some("allow") => Some(Action::Allow),
            Some("deny") => Some(Action::Deny),
            _ => None,
        };
        let stats_row = StatsRow {
            first_seen: time.map_or(query.since, |t| DateTime::from_naive_utc_and_offset(t, Utc)),
            country,
            method,
            requested: row.try_get(3).map_err(get)?,
            decision: action
                .map(|a| Ok((a, rule, row.try_get(6)?)))
                .transpose()
                .map_err(get)?,
            price: currency.zip(spent),
            status: row.try_get(7).map_err(get)?,
        };
        builder.add_many(&stats_row, u64::try_from(count).unwrap_or(0));
    }
    Ok(builder.finish())
}
