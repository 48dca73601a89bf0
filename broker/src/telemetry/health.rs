//! What a card's samples say about its health. Pure: the monitor feeds it samples and the
//! card's recorded health, and proposes a command when the answer differs.

use suanli_types::CardHealth;

/// A card at or above this temperature is overheating (data-centre GPUs slow down near 90 °C).
pub const OVERHEAT_C: u32 = 90;
/// …and recovers below this one, so a card hovering at the threshold does not flap.
pub const RECOVER_C: u32 = 85;
/// A critical XID keeps a card faulty until this long passes without another.
pub const XID_QUIET_MS: i64 = 10 * 60 * 1000;

/// XIDs that mean the card cannot be trusted with work (NVIDIA's XID catalogue: double-bit
/// ECC, row-remapping failure, NVLink, fallen off the bus, uncontained ECC, GSP errors, …).
/// Application faults such as 13, 31 and 43 are the tenant's and are not a card fault.
pub const CRITICAL_XIDS: &[u32] = &[48, 62, 63, 64, 69, 74, 79, 92, 94, 95, 109, 119, 120, 140];

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
pub fn evaluate(previous: CardHealth, observation: &Observation) -> CardHealth {
    if !observation.present {
        return CardHealth::Lost;
    }
    if observation.last_critical_xid_ms.is_some_and(|at| observation.at_ms - at < XID_QUIET_MS) {
        return CardHealth::XidError;
    }
    let hot = if previous == CardHealth::Overheating {
        observation.temperature_c >= RECOVER_C
    } else {
        observation.temperature_c >= OVERHEAT_C
    };
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
    fn overheating_has_hysteresis() {
        assert_eq!(evaluate(CardHealth::Healthy, &seen(89)), CardHealth::Healthy);
        assert_eq!(evaluate(CardHealth::Healthy, &seen(90)), CardHealth::Overheating);
        assert_eq!(evaluate(CardHealth::Overheating, &seen(87)), CardHealth::Overheating);
        assert_eq!(evaluate(CardHealth::Overheating, &seen(84)), CardHealth::Healthy);
    }

    #[test]
    fn lost_beats_everything_and_xids_fade() {
        let lost = Observation { present: false, ..seen(95) };
        assert_eq!(evaluate(CardHealth::Healthy, &lost), CardHealth::Lost);
        let xid = Observation { last_critical_xid_ms: Some(1_000_000 - 1_000), ..seen(50) };
        assert_eq!(evaluate(CardHealth::Healthy, &xid), CardHealth::XidError);
        let faded = Observation { last_critical_xid_ms: Some(1_000_000 - XID_QUIET_MS), ..seen(50) };
        assert_eq!(evaluate(CardHealth::XidError, &faded), CardHealth::Healthy);
        assert_eq!(evaluate(CardHealth::AgentSilent, &seen(50)), CardHealth::Healthy);
        assert!(is_critical_xid(79) && !is_critical_xid(13));
    }
}
