//! What a card's samples say about its health. Pure: the monitor feeds it samples and the
//! card's recorded health, and proposes a command when the answer differs.

use suanli_types::CardHealth;

/// A card at or above this temperature is overheating (data-centre GPUs slow down near 90 °C).
pub const OVERHEAT_C: u32 = 90;
/// …and recovers below this one, so a card hovering at the threshold does not flap.
pub const RECOVER_C: u32 = 85;
/// A critical XID (or a rise of the uncorrected-ECC counter) keeps a card faulty until this long
/// passes without another.
pub const XID_QUIET_MS: i64 = 10 * 60 * 1000;

/// XIDs that mean the card cannot be trusted with work (NVIDIA's XID catalogue: double-bit
/// ECC, row-remapping failure, NVLink, fallen off the bus, uncontained ECC, GSP errors, …).
/// Application faults such as 13, 31 and 43 are the tenant's and are not a card fault.
pub const CRITICAL_XIDS: &[u32] = &[48, 62, 63, 64, 69, 74, 79, 92, 94, 95, 109, 119, 120, 140];

/// The thresholds an operator may tune (`[broker.health]`); the constants above are the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthRules {
    pub overheat_c: u32,
    pub recover_c: u32,
    pub xid_quiet_ms: i64,
}

impl Default for HealthRules {
    fn default() -> Self {
        HealthRules { overheat_c: OVERHEAT_C, recover_c: RECOVER_C, xid_quiet_ms: XID_QUIET_MS }
    }
}

impl HealthRules {
    /// Problems with a configuration, in words.
    pub fn check(&self) -> Result<(), String> {
        if !(self.recover_c < self.overheat_c && self.overheat_c <= 120) {
            return Err(format!("health: recover_c ({}) must be below overheat_c ({}), which is at most 120", self.recover_c, self.overheat_c));
        }
        if self.xid_quiet_ms < 1000 {
            return Err("health: xid_quiet_ms must be at least 1000".into());
        }
        Ok(())
    }
}

pub fn is_critical_xid(xid: u32) -> bool {
    CRITICAL_XIDS.contains(&xid)
}

/// One card's latest sample, as health sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub present: bool,
    pub temperature_c: u32,
    /// When this card last reported a critical XID, if ever.
    pub last_critical_xid_ms: Option<i64>,
    pub at_ms: i64,
}

/// The health `observation` implies for a card whose recorded health is `previous`.
pub fn evaluate(previous: CardHealth, observation: &Observation, rules: &HealthRules) -> CardHealth {
    if !observation.present {
        return CardHealth::Lost;
    }
    if observation.last_critical_xid_ms.is_some_and(|at| observation.at_ms - at < rules.xid_quiet_ms) {
        return CardHealth::XidError;
    }
    let hot = if previous == CardHealth::Overheating { observation.temperature_c >= rules.recover_c } else { observation.temperature_c >= rules.overheat_c };
    if hot {
        CardHealth::Overheating
    } else {
        CardHealth::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(temperature_c: u32) -> Observation {
        Observation { present: true, temperature_c, last_critical_xid_ms: None, at_ms: 1_000_000 }
    }

    #[test]
    fn tuned_thresholds_apply() {
        let rules = HealthRules { overheat_c: 80, recover_c: 70, xid_quiet_ms: 1000 };
        assert_eq!(evaluate(CardHealth::Healthy, &seen(80), &rules), CardHealth::Overheating);
        assert_eq!(evaluate(CardHealth::Overheating, &seen(75), &rules), CardHealth::Overheating);
        assert_eq!(evaluate(CardHealth::Overheating, &seen(69), &rules), CardHealth::Healthy);
        assert!(HealthRules { recover_c: 90, ..HealthRules::default() }.check().is_err());
        assert!(HealthRules::default().check().is_ok());
    }

    #[test]
    fn overheating_has_hysteresis() {
        assert_eq!(evaluate(CardHealth::Healthy, &seen(89), &HealthRules::default()), CardHealth::Healthy);
        assert_eq!(evaluate(CardHealth::Healthy, &seen(90), &HealthRules::default()), CardHealth::Overheating);
        assert_eq!(evaluate(CardHealth::Overheating, &seen(87), &HealthRules::default()), CardHealth::Overheating);
        assert_eq!(evaluate(CardHealth::Overheating, &seen(84), &HealthRules::default()), CardHealth::Healthy);
    }

    #[test]
    fn lost_beats_everything_and_xids_fade() {
        let lost = Observation { present: false, ..seen(95) };
        assert_eq!(evaluate(CardHealth::Healthy, &lost, &HealthRules::default()), CardHealth::Lost);
        let xid = Observation { last_critical_xid_ms: Some(1_000_000 - 1_000), ..seen(50) };
        assert_eq!(evaluate(CardHealth::Healthy, &xid, &HealthRules::default()), CardHealth::XidError);
        let faded = Observation { last_critical_xid_ms: Some(1_000_000 - XID_QUIET_MS), ..seen(50) };
        assert_eq!(evaluate(CardHealth::XidError, &faded, &HealthRules::default()), CardHealth::Healthy);
        assert_eq!(evaluate(CardHealth::AgentSilent, &seen(50), &HealthRules::default()), CardHealth::Healthy);
        assert!(is_critical_xid(79) && !is_critical_xid(13));
    }
}
