//! Money, prices and the one rounding rule.
//!
//! Money is an integer count of a currency's minor unit (fen for CNY), never a float.
//! A supplier prices each card per billing period (hour, day, month, year). A period's price
//! divided down to a card-second is a fraction of a fen (42,500.00 CNY a month for 8 cards is
//! about 0.205 fen per card-second), so rates are never stored divided: a charge for any
//! duration is computed exactly as a rational number of minor units,
//! `price_per_period × cards × seconds / period_seconds`, in 128-bit integers, and
//! **rounded once per billing line, half up** (half a fen or more becomes a whole fen).
//! A whole number of periods needs no rounding at all.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, FieldError, Validator};

/// ISO 4217 alphabetic code, e.g. `CNY`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Currency(String);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        if raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Currency(raw.to_owned()))
        } else {
            Err(FieldError::new("currency", format!("expected a 3-letter ISO 4217 code such as CNY, got {raw:?}")))
        }
    }

    pub fn cny() -> Self {
        Currency("CNY".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Minor units per major unit. Every currency the platform settles in has two decimals.
    pub fn minor_per_major(&self) -> i64 {
        100
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub currency: Currency,
    /// Minor units (fen). Negative only for refunds and ledger credits.
    pub minor: i64,
}

impl Money {
    pub fn new(currency: Currency, minor: i64) -> Self {
        Money { currency, minor }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = self.currency.minor_per_major();
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        write!(f, "{sign}{}.{:02} {}", abs / per as u64, abs % per as u64, self.currency)
    }
}

/// How a researcher pays for a lease; the supplier chooses which modes it offers. (Named in
/// JSON and job specs as `hourly` …; postcard in the Raft log encodes the variant index.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingMode {
    /// Pay as you go, per hour.
    Hourly,
    Daily,
    /// A month is 30 days for billing.
    Monthly,
    /// A year is 365 days for billing.
    Yearly,
}

impl BillingMode {
    pub const ALL: [BillingMode; 4] = [BillingMode::Hourly, BillingMode::Daily, BillingMode::Monthly, BillingMode::Yearly];

    pub const fn period_seconds(self) -> i64 {
        match self {
            BillingMode::Hourly => 3_600,
            BillingMode::Daily => 86_400,
            BillingMode::Monthly => 30 * 86_400,
            BillingMode::Yearly => 365 * 86_400,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BillingMode::Hourly => "hourly",
            BillingMode::Daily => "daily",
            BillingMode::Monthly => "monthly",
            BillingMode::Yearly => "yearly",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == raw)
            .ok_or_else(|| FieldError::new("billing_mode", format!("expected hourly, daily, monthly or yearly, got {raw:?}")))
    }
}

impl fmt::Display for BillingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most one card may cost per period: 100 million CNY. Keeps every charge computation far
/// inside 128-bit range and catches a price typed in the wrong unit.
pub const MAX_PRICE_MINOR: i64 = 10_000_000_000;

/// A supplier's prices: minor units per card per billing period, for each mode it offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceList {
    pub currency: Currency,
    pub per_card: BTreeMap<BillingMode, i64>,
}

impl PriceList {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Validator::new();
        v.check(!self.per_card.is_empty(), "prices", "offer at least one billing mode");
        for (mode, price) in &self.per_card {
            let field = format!("prices.{mode}");
            v.check(*price > 0, &field, "price must be positive");
            v.check(*price <= MAX_PRICE_MINOR, &field, format!("at most {MAX_PRICE_MINOR} minor units per card"));
        }
        v.finish()
    }

    pub fn price(&self, mode: BillingMode) -> Result<i64, DomainError> {
        self.per_card.get(&mode).copied().ok_or(DomainError::BillingModeNotOffered(mode))
    }

    /// The price of `periods` whole periods on `cards` cards: exact, no rounding.
    pub fn quote(&self, mode: BillingMode, cards: u32, periods: u32) -> Result<Money, DomainError> {
        let price = self.price(mode)? as i128;
        let total = price * cards as i128 * periods as i128;
        let minor = i64::try_from(total).map_err(|_| DomainError::invalid("periods", "the total price is out of range"))?;
        Ok(Money::new(self.currency.clone(), minor))
    }

    /// The charge for `seconds` on `cards` cards at this mode's rate, rounded once, half up.
    pub fn charge_for_seconds(&self, mode: BillingMode, cards: u32, seconds: i64) -> Result<Money, DomainError> {
        let price = self.price(mode)? as i128;
        let numerator = price * cards as i128 * seconds.max(0) as i128;
        let minor = round_half_up(numerator, mode.period_seconds() as i128);
        let minor = i64::try_from(minor).map_err(|_| DomainError::invalid("seconds", "the charge is out of range"))?;
        Ok(Money::new(self.currency.clone(), minor))
    }

    /// The rate per card-second in billionths of a minor unit (truncated), for display only;
    /// charges never use it.
    pub fn nano_minor_per_card_second(&self, mode: BillingMode) -> Result<i128, DomainError> {
        Ok(self.price(mode)? as i128 * 1_000_000_000 / mode.period_seconds() as i128)
    }
}

/// A common denominator of every billing period in milliseconds (hour, day, 30 days,
/// 365 days): lets the cost of time on cards of differently priced leases be one exact
/// fraction, rounded once.
const PERIOD_LCM_MS: i128 = 86_400_000 * 2_190;

/// The cost of `ms` milliseconds on each of the given cards, each given as (price per card
/// per period, period seconds): exact, rounded once, half up. A job's attempt is priced so.
pub fn card_time_cost(cards: &[(i64, i64)], ms: u64) -> i64 {
    let numerator: i128 = cards
        .iter()
        .filter(|(_, period_s)| *period_s > 0 && PERIOD_LCM_MS % (*period_s as i128 * 1000) == 0)
        .map(|&(price, period_s)| price.max(0) as i128 * ms as i128 * (PERIOD_LCM_MS / (period_s as i128 * 1000)))
        .sum();
    i64::try_from(round_half_up(numerator, PERIOD_LCM_MS)).unwrap_or(i64::MAX)
}

/// `numerator / denominator` rounded half up, for a non-negative numerator and positive
/// denominator.
pub fn round_half_up(numerator: i128, denominator: i128) -> i128 {
    debug_assert!(numerator >= 0 && denominator > 0);
    (numerator + denominator / 2) / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monthly(price: i64) -> PriceList {
        PriceList { currency: Currency::cny(), per_card: BTreeMap::from([(BillingMode::Monthly, price)]) }
    }

    #[test]
    fn seed_example_price_is_exact() {
        // 42,500.00 CNY a month for an 8-card node is 5,312.50 CNY per card.
        let prices = monthly(531_250);
        assert_eq!(prices.quote(BillingMode::Monthly, 8, 1).unwrap().minor, 4_250_000);
        assert_eq!(prices.quote(BillingMode::Monthly, 8, 1).unwrap().to_string(), "42500.00 CNY");
    }

    #[test]
    fn sub_fen_rates_round_once_half_up() {
        let prices = monthly(531_250);
        // One card-second is 531250 / 2592000 = 0.2049… fen → 0 fen.
        assert_eq!(prices.charge_for_seconds(BillingMode::Monthly, 1, 1).unwrap().minor, 0);
        // Three card-seconds on one line: 0.6149… fen → 1 fen; rounding per second would give 0.
        assert_eq!(prices.charge_for_seconds(BillingMode::Monthly, 3, 1).unwrap().minor, 1);
        // A whole month charged by the second equals the monthly price exactly.
        assert_eq!(prices.charge_for_seconds(BillingMode::Monthly, 8, BillingMode::Monthly.period_seconds()).unwrap().minor, 4_250_000);
        assert_eq!(prices.nano_minor_per_card_second(BillingMode::Monthly).unwrap(), 204_957_561);
    }

    #[test]
    fn card_time_is_priced_over_one_denominator() {
        // Half an hour on two hourly cards at 6.00 CNY: 6.00 CNY.
        assert_eq!(card_time_cost(&[(600, 3_600), (600, 3_600)], 1_800_000), 600);
        // A monthly card and an hourly card together, rounded once.
        let month = BillingMode::Monthly.period_seconds();
        let exact = 531_250.0 * 1_000.0 / (month as f64 * 1000.0) + 600.0 * 1_000.0 / 3_600_000.0;
        assert_eq!(card_time_cost(&[(531_250, month), (600, 3_600)], 1_000), exact.round() as i64);
    }

    #[test]
    fn round_half_up_rule() {
        assert_eq!(round_half_up(5, 10), 1);
        assert_eq!(round_half_up(4, 10), 0);
        assert_eq!(round_half_up(15, 10), 2);
        assert_eq!(round_half_up(25, 10), 3);
    }

    #[test]
    fn prices_are_validated() {
        assert!(monthly(-1).validate().is_err());
        assert!(monthly(0).validate().is_err());
        assert!(monthly(MAX_PRICE_MINOR + 1).validate().is_err());
        let empty = PriceList { currency: Currency::cny(), per_card: BTreeMap::new() };
        assert!(empty.validate().is_err());
        assert!(matches!(monthly(1).price(BillingMode::Hourly), Err(DomainError::BillingModeNotOffered(BillingMode::Hourly))));
    }

    #[test]
    fn money_displays_in_major_units() {
        assert_eq!(Money::new(Currency::cny(), -5).to_string(), "-0.05 CNY");
        assert!(Currency::parse("cny").is_err());
    }
}
