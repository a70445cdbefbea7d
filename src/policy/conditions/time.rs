//! `time`: the decision's time, in a time zone, is on one of some days and within a
//! range of hours.

use chrono::{DateTime, Datelike, NaiveTime, Utc, Weekday};
use schemars::JsonSchema;
use serde::Deserialize;

use super::{Check, CompileContext, Compiled, Condition};
use crate::policy::facts::Facts;

pub(in crate::policy) struct Time;

/// A time window.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct TimeFile {
    /// IANA time zone, e.g. Europe/Stockholm or UTC.
    tz: String,
    /// Days of the week (mon, tue, …); all days when empty.
    #[serde(default)]
    days: Vec<String>,
    /// ["HH:MM", "HH:MM"], start inclusive, end exclusive; may wrap midnight.
    #[serde(default)]
    #[schemars(length(min = 2, max = 2))]
    between: Option<Vec<String>>,
}

impl Condition for Time {
    const HOLDS_WHEN: &'static str = "the time in an IANA zone is on one of `days` (`mon`…`sun`, ranges `mon-fri`) and within `between` (start inclusive, end exclusive; may wrap midnight)";
    const EXAMPLE: &'static str =
        r#"time = { tz = "Europe/Berlin", days = ["mon-fri"], between = ["22:00", "06:00"] }"#;
    type File = TimeFile;

    fn compile(file: &TimeFile, _: &CompileContext<'_>) -> Result<Compiled, String> {
        let window = TimeWindow::compile(file)?;
        Ok(Compiled::Check(Box::new(window)))
    }
}

#[derive(Debug, Clone)]
struct TimeWindow {
    tz: chrono_tz::Tz,
    /// Monday first; all true when no days were given.
    days: [bool; 7],
    between: Option<(NaiveTime, NaiveTime)>,
    written: String,
}

impl TimeWindow {
    fn compile(t: &TimeFile) -> Result<Self, String> {
        let tz: chrono_tz::Tz =
            t.tz.parse()
                .map_err(|_| format!("`{}` is not an IANA time zone like Europe/Berlin", t.tz))?;
        let mut days = [t.days.is_empty(); 7];
        for spec in &t.days {
            let day = |s: &str| -> Result<usize, String> {
                s.parse::<Weekday>()
                    .map(|d| d.num_days_from_monday() as usize)
                    .map_err(|_| format!("`{s}` is not a day (mon … sun)"))
            };
            match spec.split_once('-') {
                Some((from, to)) => {
                    let (from, to) = (day(from)?, day(to)?);
                    let mut d = from;
                    loop {
                        days[d] = true;
                        if d == to {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => days[day(spec)?] = true,
            }
        }
        let between = t
            .between
            .as_ref()
            .map(|times| {
                let [a, b] = times.as_slice() else {
                    return Err(format!(
                        "time.between needs two times, [\"HH:MM\", \"HH:MM\"], not {}",
                        times.len()
                    ));
                };
                let parse = |s: &str| {
                    NaiveTime::parse_from_str(s, "%H:%M")
                        .map_err(|_| format!("`{s}` is not a time like 22:00"))
                };
                Ok::<_, String>((parse(a)?, parse(b)?))
            })
            .transpose()?;
        Ok(Self {
            tz,
            days,
            between,
            written: written(t),
        })
    }

    fn contains(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.tz);
        let day_ok = self.days[local.weekday().num_days_from_monday() as usize];
        let time = local.time();
        let time_ok = match self.between {
            None => true,
            Some((start, end)) if start <= end => time >= start && time < end,
            Some((start, end)) => time >= start || time < end, // wraps midnight
        };
        day_ok && time_ok
    }
}

impl Check for TimeWindow {
    fn holds(&self, f: &Facts<'_>) -> bool {
        self.contains(f.now)
    }

    fn describe(&self) -> String {
        self.written.clone()
    }
}

/// The condition as an operator reads it, e.g. `time Europe/Berlin mon-fri 22:00-06:00`.
fn written(t: &TimeFile) -> String {
    let mut out = format!("time {}", t.tz);
    if !t.days.is_empty() {
        out.push(' ');
        out.push_str(&t.days.join(","));
    }
    if let Some(between) = &t.between {
        out.push(' ');
        out.push_str(&between.join("-"));
    }
    out
}
