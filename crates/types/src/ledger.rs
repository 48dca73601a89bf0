//! The double-entry ledger's vocabulary.
//!
//! Every movement of money is a [`Transaction`] whose entries sum to zero in each currency.
//! Balances are kept per ([`LedgerAccount`], currency). Signs: an account's balance is what the
//! platform owes its holder (a researcher's prepaid money, a supplier's earnings) or, for the
//! platform's own accounts, what it has earned; `Funding` is the outside world, so it goes
//! negative by every deposit that enters.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, JobId, LeaseId};
use crate::money::Currency;
use crate::time::Timestamp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerAccount {
    /// A researcher's prepaid money that no lease holds. May go negative down to the credit
    /// an operator granted.
    Available(AccountId),
    /// A researcher's money held for live leases: what they prepaid and has not been charged
    /// or refunded yet.
    Held(AccountId),
    /// What the platform owes a supplier for time its cards were used.
    Earnings(AccountId),
    /// The platform's fee on every charge.
    PlatformFees,
    /// Money entering (deposits) or leaving (payouts) the platform.
    Funding,
    // Appended (format 5): encoded ledger accounts name variants by position.
    /// A researcher's money held for leases of other federation members' cards.
    RemoteHeld(AccountId),
    /// What this member owes other federation members for its researchers' use of their
    /// cards, until it settles with them (the settlement report says with whom).
    FederationPayable,
}

impl LedgerAccount {
    /// The person an account belongs to, if any.
    pub fn holder(self) -> Option<AccountId> {
        match self {
            LedgerAccount::Available(a) | LedgerAccount::Held(a) | LedgerAccount::Earnings(a) | LedgerAccount::RemoteHeld(a) => Some(a),
            LedgerAccount::PlatformFees | LedgerAccount::Funding | LedgerAccount::FederationPayable => None,
        }
    }
}

impl fmt::Display for LedgerAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerAccount::Available(a) => write!(f, "available:{a}"),
            LedgerAccount::Held(a) => write!(f, "held:{a}"),
            LedgerAccount::Earnings(a) => write!(f, "earnings:{a}"),
            LedgerAccount::PlatformFees => f.write_str("platform-fees"),
            LedgerAccount::Funding => f.write_str("funding"),
            LedgerAccount::RemoteHeld(a) => write!(f, "remote-held:{a}"),
            LedgerAccount::FederationPayable => f.write_str("federation-payable"),
        }
    }
}

/// Why money moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionKind {
    /// Money paid in (by the payment service, through the platform).
    Deposit,
    /// A lease's price held from the researcher's available balance at request or extension.
    Hold,
    /// Metered use charged from the hold: supplier earnings plus the platform fee.
    Charge,
    /// The unused part of a hold returned when a lease ends.
    Refund,
    /// Card-time the researcher was not charged for because a card dropped off (SPEC §3
    /// evaluation); recorded when the lease ends, as part of the refund.
    ServiceCredit,
    /// Money paid out to a supplier.
    Payout,
}

impl TransactionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionKind::Deposit => "deposit",
            TransactionKind::Hold => "hold",
            TransactionKind::Charge => "charge",
            TransactionKind::Refund => "refund",
            TransactionKind::ServiceCredit => "service_credit",
            TransactionKind::Payout => "payout",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub account: LedgerAccount,
    /// Minor units; positive credits the account, negative debits it.
    pub minor: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub id: u64,
    pub at: Timestamp,
    pub kind: TransactionKind,
    pub currency: Currency,
    pub lease: Option<LeaseId>,
    pub job: Option<JobId>,
    pub entries: Vec<Entry>,
}

impl Transaction {
    /// The one rule of double entry.
    pub fn balanced(&self) -> bool {
        self.entries.iter().map(|e| e.minor as i128).sum::<i128>() == 0
    }

    /// The net amount this transaction moved into or out of `holder`'s accounts.
    pub fn net_for(&self, account: LedgerAccount) -> i64 {
        self.entries.iter().filter(|e| e.account == account).map(|e| e.minor).sum()
    }
}

/// The platform fee in basis points of every charge (10 % here), rounded half up per lease
/// cumulatively, so the sum of fee lines equals the fee on the sum of charges.
pub const PLATFORM_FEE_BPS: i64 = 1_000;

/// A calendar month, for statements: `2026-12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Month {
    pub year: i32,
    /// 1–12.
    pub month: u32,
}

impl Month {
    pub fn parse(raw: &str) -> Option<Month> {
        let (y, m) = raw.split_once('-')?;
        let (year, month) = (y.parse().ok()?, m.parse().ok()?);
        (y.len() == 4 && m.len() == 2 && (1..=12).contains(&month) && (1970..=9999).contains(&year)).then_some(Month { year, month })
    }

    /// The UTC month `at` falls in.
    pub fn containing(at: Timestamp) -> Month {
        let days = at.millis().div_euclid(86_400_000);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Month { year: year as i32, month: month as u32 }
    }

    /// `[start, end)` in milliseconds since the epoch, UTC.
    pub fn bounds(self) -> (Timestamp, Timestamp) {
        let next = if self.month == 12 { Month { year: self.year + 1, month: 1 } } else { Month { year: self.year, month: self.month + 1 } };
        (
            Timestamp::from_millis(days_from_civil(self.year, self.month, 1) * 86_400_000),
            Timestamp::from_millis(days_from_civil(next.year, next.month, 1) * 86_400_000),
        )
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let y = i64::from(if month <= 2 { year - 1 } else { year });
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_bounds_are_utc_calendar_months() {
        let (start, end) = Month::parse("2026-12").unwrap().bounds();
        assert_eq!(start.millis(), 1_796_083_200_000); // 2026-12-01T00:00:00Z
        assert_eq!(end.millis(), 1_798_761_600_000); // 2027-01-01T00:00:00Z
        let (s, e) = Month::parse("2024-02").unwrap().bounds();
        assert_eq!((e.millis() - s.millis()) / 86_400_000, 29);
        assert!(Month::parse("2026-13").is_none());
        assert!(Month::parse("26-1").is_none());
        for m in ["1970-01", "2024-02", "2026-12", "2027-01", "2100-03"] {
            let month = Month::parse(m).unwrap();
            let (start, end) = month.bounds();
            assert_eq!(Month::containing(start), month);
            assert_eq!(Month::containing(Timestamp::from_millis(end.millis() - 1)), month);
        }
    }
}
