//! Go's `time.Time` on the wire.

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use std::fmt;
use std::str::FromStr;

/// An instant as Go's `time.Time` marshals it: RFC 3339 with nanoseconds trimmed of
/// trailing zeros (`time.RFC3339Nano`), in UTC here.
///
/// Go's zero time, `0001-01-01T00:00:00Z`, is this type's [`Default`] and [`Time::ZERO`]:
/// Go structs write it for unset non-pointer times (`Node.KeyExpiry` = "never expires",
/// `RegisterRequest.Expiry` = "no preference"), so it must stay representable and
/// distinguishable ([`Time::is_zero`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub DateTime<Utc>);

impl Time {
    /// Go's zero `time.Time`, January 1 of year 1, 00:00:00 UTC.
    pub const ZERO: Time = Time(
        match NaiveDate::from_ymd_opt(1, 1, 1) {
            Some(d) => d,
            None => panic!("year 1 is representable"),
        }
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc(),
    );

    /// The current time.
    pub fn now() -> Self {
        Time(Utc::now())
    }

    /// Whether this is Go's zero time (which Go code tests with `t.IsZero()`).
    pub fn is_zero(&self) -> bool {
        *self == Time::ZERO
    }

    /// `None` for Go's zero time, the instant otherwise.
    pub fn to_option(&self) -> Option<DateTime<Utc>> {
        (!self.is_zero()).then_some(self.0)
    }
}

impl Default for Time {
    fn default() -> Self {
        Time::ZERO
    }
}

impl From<DateTime<Utc>> for Time {
    fn from(t: DateTime<Utc>) -> Self {
        Time(t)
    }
}

impl fmt::Display for Time {
    /// Exactly Go's `time.RFC3339Nano` layout for a UTC time.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )?;
        let nanos = t.nanosecond() % 1_000_000_000;
        if nanos != 0 {
            let frac = format!("{nanos:09}");
            write!(f, ".{}", frac.trim_end_matches('0'))?;
        }
        f.write_str("Z")
    }
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Time({self})")
    }
}

impl FromStr for Time {
    type Err = chrono::ParseError;
    /// Any RFC 3339 timestamp (Go writes other offsets than `Z` for non-UTC times).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DateTime::parse_from_rfc3339(s).map(|t| Time(t.with_timezone(&Utc)))
    }
}

impl serde::Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Time {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
