//! The canary share of a route.

use std::fmt;

/// A canary weight in basis points: 0 (no canary traffic) to 10 000 (all traffic).
///
/// One basis point is 0.01 %, the finest step users can configure. The type can only
/// hold valid values, so the data plane never re-checks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Weight(u16);

impl Weight {
    /// No canary traffic.
    pub const ZERO: Weight = Weight(0);
    /// All traffic on the canary.
    pub const FULL: Weight = Weight(10_000);

    /// Builds a weight from basis points; `None` above 10 000.
    pub const fn from_basis_points(bp: u16) -> Option<Weight> {
        if bp <= 10_000 {
            Some(Weight(bp))
        } else {
            None
        }
    }

    /// Builds a weight from a percentage with at most two decimals (e.g. `12.5`).
    ///
    /// Returns `None` when the value is outside 0–100, not finite, or has a finer
    /// resolution than 0.01.
    pub fn from_percent(percent: f64) -> Option<Weight> {
        if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
            return None;
        }
        let bp = (percent * 100.0).round();
        if ((percent * 100.0) - bp).abs() > 1e-6 {
            return None;
        }
        Weight::from_basis_points(bp as u16)
    }

    /// The weight in basis points (0–10 000).
    pub const fn basis_points(self) -> u16 {
        self.0
    }

    /// The weight as a percentage (0.0–100.0).
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 100, self.0 % 100);
        if frac == 0 {
            write!(f, "{whole}%")
        } else if frac % 10 == 0 {
            write!(f, "{whole}.{}%", frac / 10)
        } else {
            write!(f, "{whole}.{frac:02}%")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_with_two_decimals_is_exact() {
        assert_eq!(Weight::from_percent(12.34).unwrap().basis_points(), 1234);
        assert_eq!(Weight::from_percent(0.01).unwrap().basis_points(), 1);
        assert_eq!(Weight::from_percent(100.0), Some(Weight::FULL));
        assert_eq!(Weight::from_percent(0.0), Some(Weight::ZERO));
    }

    #[test]
    fn out_of_range_or_too_fine_is_rejected() {
        assert_eq!(Weight::from_percent(100.01), None);
        assert_eq!(Weight::from_percent(-1.0), None);
        assert_eq!(Weight::from_percent(0.001), None);
        assert_eq!(Weight::from_percent(f64::NAN), None);
        assert_eq!(Weight::from_basis_points(10_001), None);
    }

    #[test]
    fn display_is_percent() {
        assert_eq!(
            Weight::from_basis_points(1250).unwrap().to_string(),
            "12.5%"
        );
        assert_eq!(
            Weight::from_basis_points(1205).unwrap().to_string(),
            "12.05%"
        );
        assert_eq!(Weight::FULL.to_string(), "100%");
    }
}
