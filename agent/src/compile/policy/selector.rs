//! Label selectors (metav1.LabelSelector), evaluated as the API machinery does: every
//! matchLabels pair and every matchExpressions requirement must hold; an empty selector
//! selects everything. Objects reaching compile are validated, so operators are known.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// Whether `selector` selects an object with `labels`.
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    pairs
        && selector.match_expressions.iter().flatten().all(|r| {
            let value = labels.get(&r.key);
            let values = r.values.as_deref().unwrap_or_default();
            match r.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                // Rejected by validation; never selects if it slipped through.
                _ => false,
            }
        })
}

/// Whether a selector is empty (selects everything).
pub fn is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
            }]),
            ..LabelSelector::default()
        }
    }

    #[test]
    fn operators_follow_the_api_machinery() {
        let l = labels(&[("pod", "b"), ("tier", "web")]);
        assert!(matches(&LabelSelector::default(), &l));
        assert!(matches(&expr("pod", "In", &["a", "b"]), &l));
        assert!(!matches(&expr("pod", "In", &["a"]), &l));
        assert!(!matches(&expr("missing", "In", &["a"]), &l));
        assert!(matches(&expr("pod", "NotIn", &["a"]), &l));
        assert!(matches(&expr("missing", "NotIn", &["a"]), &l));
        assert!(!matches(&expr("pod", "NotIn", &["b"]), &l));
        assert!(matches(&expr("tier", "Exists", &[]), &l));
        assert!(!matches(&expr("tier", "DoesNotExist", &[]), &l));
        assert!(matches(&expr("missing", "DoesNotExist", &[]), &l));
        let both = LabelSelector {
            match_labels: Some(labels(&[("tier", "web")])),
            ..expr("pod", "In", &["c"])
        };
        assert!(!matches(&both, &l), "matchLabels AND matchExpressions");
    }
}
