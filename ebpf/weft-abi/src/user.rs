//! What the agent needs of the shared vocabularies: each enum serializes as its name (flow
//! records, the admin API) and is a Prometheus label value, in the one spelling `as_str`
//! gives.
extern crate std;

use core::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::{conn::DropReason, net::Direction, policy::Match, stats::Counter};

macro_rules! named {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = std::string::String::deserialize(d)?;
                <$t>::ALL
                    .into_iter()
                    .find(|v| v.as_str() == name)
                    .ok_or_else(|| serde::de::Error::unknown_variant(&name, &[]))
            }
        }

        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), core::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}

named!(Direction, DropReason, Match, Counter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde() {
        for d in Direction::ALL {
            let text = serde_json::to_string(&d).expect("serializes");
            assert_eq!(text, std::format!("\"{}\"", d.as_str()));
            assert_eq!(serde_json::from_str::<Direction>(&text).expect("parses"), d);
        }
        let r: DropReason = serde_json::from_str("\"no_backends\"").expect("parses");
        assert_eq!(r, DropReason::NoBackends);
        assert!(serde_json::from_str::<DropReason>("\"other\"").is_err());
    }
}
