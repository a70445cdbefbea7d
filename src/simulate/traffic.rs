//! The synthetic traffic: legitimate users in twelve countries on a daily curve, a
//! marketing spike, and the kinds of SMS pumping verigate must stop. Every attack kind is
//! described where it is generated, with the reason it is hard.

use std::fmt;

use crate::events::{Identity, Price, VerificationMethod, VerificationRequestEvent};

use super::{Rng, SimVerification, Truth};

const MINUTE_MS: i64 = 60_000;
const DAY_MINUTES: i64 = 24 * 60;

/// Where legitimate users are.
struct Country {
    /// ISO code, for the scorecard.
    iso: &'static str,
    /// Calling code and the block the numbers start with.
    block: &'static str,
    /// Digits after the block.
    digits: usize,
    /// Share of legitimate traffic.
    share: f64,
    /// EUR per attempt.
    price: f64,
    /// Share of users who enter the code.
    conversion: f64,
}

const COUNTRIES: [Country; 12] = [
    country("SE", "+4670", 7, 0.20, 0.045, 0.83),
    country("DE", "+4915", 8, 0.15, 0.075, 0.83),
    // One busy operator block: a tenth of all traffic shares `+44791`.
    country("GB", "+44791", 7, 0.10, 0.035, 0.83),
    country("GB", "+447", 9, 0.06, 0.035, 0.83),
    country("FR", "+336", 8, 0.12, 0.060, 0.83),
    country("US", "+1415", 7, 0.12, 0.008, 0.83),
    country("IN", "+9198", 8, 0.08, 0.004, 0.78),
    country("BR", "+55119", 8, 0.06, 0.030, 0.80),
    // An honest country where most users never enter the code (delivery is poor).
    country("KE", "+2547", 8, 0.05, 0.120, 0.35),
    country("NG", "+23480", 8, 0.03, 0.150, 0.72),
    country("BD", "+880171", 7, 0.02, 0.210, 0.70),
    country("CI", "+22507", 8, 0.01, 0.180, 0.70),
];

const fn country(
    iso: &'static str,
    block: &'static str,
    digits: usize,
    share: f64,
    price: f64,
    conversion: f64,
) -> Country {
    Country {
        iso,
        block,
        digits,
        share,
        price,
        conversion,
    }
}

/// Share of real users' attempts that come from someone verifying again (a new phone,
/// a new login) whose earlier verification succeeded, once there are such users.
const RETURNING: f64 = 1.0 / 3.0;
/// Users who may return, per country (the oldest make way beyond this).
const RETURNING_POOL: usize = 20_000;

/// A marketing campaign: five times the usual French traffic for an hour.
const SPIKE: (i64, i64, &str) = (19 * 60, 20 * 60, "+336");

/// A kind of SMS pumping the simulator generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// 40 a minute for 20 minutes to one 10,000-number premium range.
    Burst,
    /// 2 a minute for six hours over a million numbers of one operator block, so no
    /// 1,000- or 10,000-number range sees more than a few.
    SlowWide,
    /// 4 a minute for four hours, moving to a fresh 100,000-number range of the same
    /// operator block every 30 minutes.
    Rotating,
    /// 2.2 a minute for five hours into 25 ranges of the busy `+44791` block, whose
    /// conversion falls from ~0.83 to ~0.45: still above any fixed threshold, and
    /// each range sees only a few attempts an hour.
    BusyPrefix,
    /// Sixteen fresh operator blocks in eight countries, each under a request a minute,
    /// for four hours.
    Spread,
    /// Enters 30 % of the codes itself to look like users, 3 a minute for six hours.
    Mimicry,
    /// Most of one country's traffic: an attempt a minute for six hours into one
    /// operator block of Côte d'Ivoire, where the business has few users (several
    /// times their traffic), entering 5 % of the codes. The country's normal is learned
    /// from traffic that is mostly the attack, so it must not lower its own bar.
    Dominant,
    /// Hidden in the busiest real block: random numbers across all of `+44791` at
    /// 1.5 a minute for eight hours (about as many as its real users by day), nothing
    /// converts. Blocking the block would turn its real users away: it must be
    /// surfaced to an operator, and what it costs is reported.
    Hidden,
    /// Low and slow: one attempt a minute for twelve hours, spread over a
    /// 100,000-number range, so no window sees a burst.
    #[serde(rename = "low-and-slow")]
    LowSlow,
    /// An attacker who has read docs/fraud-defence.md grooms a fresh Nigerian block to
    /// look established: from 05:00 to 07:00 it verifies half a number a minute and
    /// enters 80 % of the codes; from 14:00 to 20:00 it pumps the whole block at 3 a
    /// minute, entering 5 %. Spread over a hundred million numbers, no range sees a
    /// second attempt; only the block's history tells it from a block with real users.
    Groomed,
}

impl AttackKind {
    pub const ALL: [AttackKind; 10] = [
        Self::Burst,
        Self::SlowWide,
        Self::Rotating,
        Self::BusyPrefix,
        Self::Spread,
        Self::Mimicry,
        Self::Dominant,
        Self::Hidden,
        Self::LowSlow,
        Self::Groomed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Burst => "burst",
            Self::SlowWide => "slow-wide",
            Self::Rotating => "rotating",
            Self::BusyPrefix => "busy-prefix",
            Self::Spread => "spread",
            Self::Mimicry => "mimicry",
            Self::Dominant => "dominant",
            Self::Hidden => "hidden",
            Self::LowSlow => "low-and-slow",
            Self::Groomed => "groomed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == text)
    }

    /// When it runs: minutes from the start of the attacked day.
    pub fn minutes(self) -> (i64, i64) {
        match self {
            Self::Burst => (2 * 60, 2 * 60 + 20),
            Self::SlowWide => (6 * 60, 12 * 60),
            Self::Rotating => (14 * 60, 18 * 60),
            Self::BusyPrefix => (15 * 60, 20 * 60),
            Self::Spread => (8 * 60, 12 * 60),
            Self::Mimicry => (12 * 60, 18 * 60),
            Self::Dominant => (9 * 60, 15 * 60),
            Self::Hidden => (10 * 60, 18 * 60),
            Self::LowSlow => (3 * 60, 15 * 60),
            Self::Groomed => (5 * 60, 20 * 60),
        }
    }

    /// Whether it is pumping at `of_day` (minutes into the attacked day): what its time
    /// to first denial counts from. A groom's verifications convert; they only prepare.
    pub fn pumps_at(self, of_day: i64) -> bool {
        match self {
            Self::Groomed => of_day >= GROOMED_PUMP.0,
            _ => true,
        }
    }

    /// Attempts a minute at `of_day`, within [`Self::minutes`].
    fn rate_at(self, of_day: i64) -> f64 {
        match self {
            Self::Groomed if (GROOMED_PUMP.0..GROOMED_PUMP.1).contains(&of_day) => 3.0,
            Self::Groomed if of_day < GROOM_ENDS => 0.5,
            Self::Groomed => 0.0,
            _ => self.per_minute(),
        }
    }

    /// At 3 or more attempts a minute: the attacks that must be stopped within minutes.
    pub fn is_fast(self) -> bool {
        self.per_minute() >= 3.0
    }

    /// Mixed into a block busy with real users, where no rule may deny safely: it must
    /// be surfaced, and is scored apart from the kinds that must be blocked.
    pub fn is_hidden(self) -> bool {
        self == Self::Hidden
    }

    /// The share of its codes it enters itself at `of_day`, to look like users.
    fn entered(self, of_day: i64) -> f64 {
        match self {
            Self::Mimicry => 0.30,
            Self::Dominant => 0.05,
            Self::Groomed if self.pumps_at(of_day) => 0.05,
            Self::Groomed => 0.80,
            _ => 0.0,
        }
    }

    fn per_minute(self) -> f64 {
        match self {
            Self::Burst => 40.0,
            Self::SlowWide => 2.0,
            Self::Rotating => 4.0,
            Self::BusyPrefix => 2.2,
            Self::Spread => 16.0 * 0.6,
            Self::Mimicry => 3.0,
            Self::Dominant => 1.0,
            Self::Hidden => 1.5,
            Self::LowSlow => 1.0,
            // Its pump's.
            Self::Groomed => 3.0,
        }
    }

    /// A number it targets at `minute` (from the start of the attacked day), and its
    /// price in EUR.
    fn target(self, minute: i64, rng: &mut Rng) -> (String, f64) {
        const SPREAD: [&str; 16] = [
            "+23324", "+23355", "+25670", "+25678", "+25575", "+25565", "+26097", "+26077",
            "+22177", "+22178", "+22370", "+22376", "+26132", "+26134", "+99890", "+99893",
        ];
        match self {
            Self::Burst => (format!("+23769912{}", rng.digits(4)), 0.26),
            Self::SlowWide => (format!("+22505{}", rng.digits(8)), 0.18),
            Self::Rotating => (
                format!("+88019{}{}", (minute / 30) % 10, rng.digits(7)),
                0.21,
            ),
            // 25 fixed 10,000-number ranges of the busy block: +44791 then 3 digits.
            Self::BusyPrefix => {
                let range = 137 + 31 * rng.below(25);
                (format!("+44791{range:03}{}", rng.digits(4)), 0.035)
            }
            Self::Spread => {
                let block = SPREAD[rng.below(SPREAD.len())];
                (format!("{block}{}", rng.digits(7)), 0.19)
            }
            Self::Mimicry => (format!("+99897{}", rng.digits(7)), 0.20),
            // Not the block of the business's own Ivorian users (`COUNTRIES`).
            Self::Dominant => (format!("+22501{}", rng.digits(8)), 0.18),
            Self::Hidden => (format!("+44791{}", rng.digits(7)), 0.035),
            Self::LowSlow => (format!("+2332071{}", rng.digits(5)), 0.19),
            // Not the block of the business's own Nigerian users (`COUNTRIES`).
            Self::Groomed => (format!("+23470{}", rng.digits(8)), 0.15),
        }
    }
}

/// When `groomed` pumps (minutes into the attacked day), and when its groom ends.
const GROOMED_PUMP: (i64, i64) = (14 * 60, 20 * 60);
const GROOM_ENDS: i64 = 7 * 60;

impl fmt::Display for AttackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub seed: u64,
    /// Legitimate verifications a minute at the evening peak.
    pub legit_per_minute: f64,
    /// Multiplies every country's share of users who enter the code (1: as listed,
    /// 83 % in most countries; 0.6: a business whose users convert half the time).
    pub legit_conversion: f64,
    /// Days of legitimate traffic before the attacked day, for the policy to learn what
    /// is normal (not scored).
    pub warmup_days: u32,
    /// Days the attacks run, at the same hours each day: the scored day and the warm-up
    /// days just before it (1: the scored day alone). An attack that comes back day
    /// after day meets what it taught the policy the day before.
    pub attack_days: u32,
    pub attacks: Vec<AttackKind>,
    /// Multiplies every attack's rate.
    pub attack_scale: f64,
    /// Whether the marketing spike runs on the attacked day.
    pub spike: bool,
    /// Multiplies every duration: the policy's and the traffic's timeline (0.1: a day
    /// passes in 2.4 hours, a policy window of 1h lasts 6 minutes). Rates per simulated
    /// minute stay as they are, so the same verifications come, faster.
    pub time_scale: f64,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            seed: 7,
            legit_per_minute: 24.0,
            legit_conversion: 1.0,
            warmup_days: 1,
            attack_days: 1,
            attacks: AttackKind::ALL.to_vec(),
            attack_scale: 1.0,
            spike: true,
            time_scale: 1.0,
        }
    }
}

/// Legitimate users in every country on a daily curve, quiet at night and busiest in the
/// early evening (UTC, for a European business): the rate at `minute` of a day.
fn legit_rate(peak: f64, minute: i64) -> f64 {
    let hour = (minute % DAY_MINUTES) as f64 / 60.0;
    let daylight = (-(((hour - 17.0) / 5.0).powi(2))).exp();
    peak * (0.15 + 0.85 * daylight)
}

struct Generator {
    rng: Rng,
    next_id: u64,
    start_ms: i64,
    /// Per country: numbers whose latest verification succeeded, and from when.
    succeeded: Vec<Vec<(String, i64)>>,
    /// What `groomed` draws from: a kind added after the others leaves their traffic,
    /// and the real users', as it was.
    groomed_rng: Rng,
}

impl Generator {
    fn new(knobs: &Knobs, start_ms: i64) -> Self {
        Self {
            rng: Rng::seeded(knobs.seed),
            next_id: 0,
            start_ms,
            succeeded: vec![Vec::new(); COUNTRIES.len()],
            groomed_rng: Rng::seeded(knobs.seed ^ 0x0067_726f_6f6d_6564),
        }
    }

    /// A user of country `c` who verified successfully before `at_ms`, taken out of the
    /// pool (this verification decides whether they go back in).
    fn returning_user(&mut self, c: usize, at_ms: i64) -> Option<String> {
        let pool = &mut self.succeeded[c];
        if pool.is_empty() {
            return None;
        }
        let i = self.rng.below(pool.len());
        (pool[i].1 <= at_ms).then(|| pool.swap_remove(i).0)
    }

    fn remember_success(&mut self, c: usize, number: String, at_ms: i64) {
        let pool = &mut self.succeeded[c];
        if pool.len() < RETURNING_POOL {
            pool.push((number, at_ms));
        } else {
            let i = self.rng.below(pool.len());
            pool[i] = (number, at_ms);
        }
    }

    /// The attacks running at `of_day` (minutes into the attacked day), `minute` minutes
    /// after the start.
    fn attacks(&mut self, knobs: &Knobs, of_day: i64, minute: i64, out: &mut Vec<SimVerification>) {
        for &kind in &knobs.attacks {
            let (from, to) = kind.minutes();
            if (from..to).contains(&of_day) {
                let own_stream = kind == AttackKind::Groomed;
                if own_stream {
                    std::mem::swap(&mut self.rng, &mut self.groomed_rng);
                }
                for _ in 0..self.rng.count(kind.rate_at(of_day) * knobs.attack_scale) {
                    out.push(self.attack(of_day, minute, kind));
                }
                if own_stream {
                    std::mem::swap(&mut self.rng, &mut self.groomed_rng);
                }
            }
        }
    }

    fn request(&mut self, at_ms: i64, number: String, price: f64) -> VerificationRequestEvent {
        self.next_id += 1;
        VerificationRequestEvent {
            id: format!("sim-{:07}", self.next_id),
            method: if self.rng.unit() < 0.9 {
                VerificationMethod::Sms
            } else {
                VerificationMethod::FlashCall
            },
            identity: Identity {
                kind: Some("number".into()),
                endpoint: number,
            },
            price: Some(Price {
                currency_id: Some("EUR".into()),
                amount: Some(price),
            }),
            rate: None,
            reference: Some(format!("signup-{at_ms}")),
            custom: None,
            accept_language: None,
        }
    }

    /// A second within `minute`, in ms since the start.
    fn at(&mut self, minute: i64) -> i64 {
        self.start_ms + minute * MINUTE_MS + (self.rng.bits() % 60_000) as i64
    }

    /// A real user of country `i`: one verifying again now and then, unless `spike`
    /// (the campaign brings new users).
    fn legit(&mut self, minute: i64, i: usize, spike: bool, scale: f64) -> SimVerification {
        let c = &COUNTRIES[i];
        let at_ms = self.at(minute);
        let returning = if !spike && self.rng.unit() < RETURNING {
            self.returning_user(i, at_ms)
        } else {
            None
        };
        let number =
            returning.unwrap_or_else(|| format!("{}{}", c.block, self.rng.digits(c.digits)));
        let request = self.request(at_ms, number.clone(), c.price);
        // Most who enter the code do so within two minutes; a few take longer.
        let result = if self.rng.unit() < (c.conversion * scale).min(0.99) {
            let after = if self.rng.unit() < 0.95 {
                30_000 + self.rng.below(90_000)
            } else {
                180_000 + self.rng.below(240_000)
            };
            ("SUCCESSFUL", None, after as i64)
        } else {
            ("FAIL", Some("Expired"), 10 * MINUTE_MS)
        };
        if result.0 == "SUCCESSFUL" {
            self.remember_success(i, number, at_ms + result.2);
        }
        SimVerification {
            at_ms,
            request,
            truth: Truth::Legit {
                country: c.iso.to_owned(),
                spike,
            },
            result: Some(owned(result)),
        }
    }

    fn attack(&mut self, minute_of_day: i64, minute: i64, kind: AttackKind) -> SimVerification {
        let at_ms = self.at(minute);
        let (number, price) = kind.target(minute_of_day, &mut self.rng);
        let request = self.request(at_ms, number, price);
        let roll = self.rng.unit();
        let result = if roll < kind.entered(minute_of_day) {
            ("SUCCESSFUL", None, 60_000)
        } else if roll > 0.95 {
            // Now and then Sinch flags one itself.
            ("DENIED", Some("Fraud"), 60_000)
        } else {
            ("FAIL", Some("Expired"), 10 * MINUTE_MS)
        };
        SimVerification {
            at_ms,
            request,
            truth: Truth::Attack(kind),
            result: Some(owned(result)),
        }
    }
}

fn owned((status, reason, after): (&str, Option<&str>, i64)) -> (String, Option<String>, i64) {
    (status.to_owned(), reason.map(str::to_owned), after)
}

/// The warm-up days and the attacked day that starts `warmup_days` after `start_ms`, in
/// time order; the attacks also run on the last `attack_days - 1` warm-up days.
pub fn synthetic(knobs: &Knobs, start_ms: i64) -> Vec<SimVerification> {
    let mut g = Generator::new(knobs, start_ms);
    let attacked_day = i64::from(knobs.warmup_days) * DAY_MINUTES;
    let attacks_from = attacked_day - i64::from(knobs.attack_days.saturating_sub(1)) * DAY_MINUTES;
    let mut out = Vec::new();
    for minute in 0..attacked_day + DAY_MINUTES {
        for _ in 0..g.rng.count(legit_rate(knobs.legit_per_minute, minute)) {
            let pick = g.rng.unit();
            let mut acc = 0.0;
            let c = COUNTRIES
                .iter()
                .position(|c| {
                    acc += c.share;
                    pick < acc
                })
                .unwrap_or(0);
            out.push(g.legit(minute, c, false, knobs.legit_conversion));
        }
        let of_day = minute - attacked_day;
        if knobs.spike && (SPIKE.0..SPIKE.1).contains(&of_day) {
            if let Some(france) = COUNTRIES.iter().position(|c| c.block == SPIKE.2) {
                let share = COUNTRIES[france].share;
                let extra = legit_rate(knobs.legit_per_minute, minute) * share * 4.0;
                for _ in 0..g.rng.count(extra) {
                    out.push(g.legit(minute, france, true, knobs.legit_conversion));
                }
            }
        }
        if minute >= attacks_from {
            g.attacks(knobs, minute.rem_euclid(DAY_MINUTES), minute, &mut out);
        }
    }
    out.sort_by_key(|v| v.at_ms);
    out
}

/// Only the attacks of `knobs`, on the day that starts at `start_ms` (to mix into
/// stored traffic).
pub fn attacks_only(knobs: &Knobs, start_ms: i64) -> Vec<SimVerification> {
    let mut g = Generator::new(knobs, start_ms);
    let mut out = Vec::new();
    for minute in 0..DAY_MINUTES {
        g.attacks(knobs, minute, minute, &mut out);
    }
    out.sort_by_key(|v| v.at_ms);
    out
}
